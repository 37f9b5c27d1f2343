//! veer's data plane: listeners, routing, upstream pools, recording, and the
//! admin endpoint. The `veer` binary (`main.rs`) wires these together.
//!
//! Request flow: [`server`] accepts → [`service`] loads the [`snapshot`],
//! matches a route ([`router`]), picks a version ([`split`]) and an endpoint
//! ([`balance`]), forwards over a pooled connection ([`upstream`]) and records
//! the outcome ([`metrics`]). [`reload`] builds new snapshots from config files.

pub mod access;
pub mod admin;
pub mod announce;
pub mod balance;
pub mod body;
pub mod check;
pub mod client;
pub mod clock;
pub mod conn;
pub mod controller;
pub mod cors;
pub mod demo;
pub mod edit;
pub mod error;
pub mod fleet;
pub mod grpc;
pub mod headers;
pub mod import;
pub mod limit;
pub mod log_drops;
pub mod metrics;
pub mod mirror;
pub mod notify;
pub mod path;
pub mod persist;
pub mod pool_metrics;
pub mod protocol;
pub mod proxy_header;
pub mod publish;
pub mod raw;
pub mod record;
pub mod reload;
pub mod reresolve;
pub mod retry;
pub mod route_metrics;
pub mod router;
pub mod run;
pub mod runtime;
pub mod server;
pub mod service;
pub mod shared;
pub mod snapshot;
pub mod sparse;
pub mod split;
pub mod status;
pub mod tickets;
pub mod tls;
pub mod token;
pub mod upload;
pub mod upstream;
pub mod upstream_tls;
pub mod window_metrics;
