//! End-to-end tests: the real `veer` binary against real loopback upstreams.
//!
//! Every test starts its own upstreams on `127.0.0.1:0` and its own veer
//! process on port 0, reads the bound addresses from veer's JSON log, and
//! waits on `/readyz` rather than sleeping. Processes are killed on drop.

#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]
// The tests time a real process from outside, in real time: the wall clock
// is what they measure (clippy.toml bans it in the proxy's own code).
#![allow(clippy::disallowed_methods)]

mod e2e {
    pub mod support;

    mod alerts;
    mod bluegreen;
    mod chosen_keys;
    mod cli;
    mod client_faults;
    mod decisions;
    mod edge;
    mod failures;
    mod fleet;
    mod force;
    mod gates;
    mod health;
    mod hostile;
    mod judge;
    mod limits;
    mod mirror;
    mod operator;
    mod outlier;
    mod pool;
    mod protocols;
    mod reload;
    mod retry;
    mod shutdown;
    mod smoke;
    mod split;
    mod upstreams;
    mod webhooks;
}
