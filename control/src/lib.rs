//! veer's control plane: everything that decides, with no networking.
//!
//! A config file becomes a validated [`config::Config`] here; the proxy turns
//! that into its routing snapshot. Reload decisions live in [`reload`]; the
//! judge ([`judge`], whose tests per limit are in [`limits`], built on
//! [`eprocess`], [`onesample`], [`keyfilter`] and [`window`])
//! turns per-version measurements into verdicts; [`state`] persists the
//! decisions that must survive a restart.

pub mod config;
pub mod eprocess;
pub mod judge;
pub mod keyfilter;
pub mod limits;
pub mod onesample;
pub mod reload;
pub mod state;
pub mod window;
