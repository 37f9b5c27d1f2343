//! veer's control plane: everything that decides, with no networking.
//!
//! A config file becomes a validated [`config::Config`] here; the proxy turns
//! that into its routing snapshot. Reload decisions (is this new content? is
//! it valid?) live in [`reload`].

pub mod config;
pub mod reload;
