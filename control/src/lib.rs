//! veer's control plane: everything that decides, with no networking.
//!
//! A config file becomes a validated [`config::Config`] here; the proxy turns
//! that into its routing snapshot. Reload decisions live in [`reload`]; the
//! judge ([`judge`], whose tests per limit are in [`limits`], built on
//! [`eprocess`], [`onesample`], [`keyfilter`] and [`window`])
//! turns per-version measurements into verdicts; [`rollout`] is the state
//! machine that turns verdicts, operator actions and config changes into
//! decisions (revert, rollout step, promotion), [`state`] persists the
//! decisions that must survive a restart, and [`fleet`] merges them with
//! the decisions a fleet of replicas shares through a store.

pub mod config;
pub mod eprocess;
pub mod fleet;
pub mod guard;
pub mod judge;
pub mod keyfilter;
pub mod limits;
pub mod onesample;
pub mod pool;
pub mod reload;
pub mod rollout;
pub mod state;
pub mod status;
pub mod window;
