//! End-to-end tests (placeholder while bootstrapping).
