//! pod-template-webhook: a Kubernetes mutating admission webhook that merges pod templates kept
//! in ConfigMaps into pods.
//!
//! Data flows one way: request → [`admission`] → [`store`] lookup → [`merge`] → patch → response.
//! [`merge`], [`doc`], [`patch`] and [`template`] are pure; [`server`], [`tls`], [`store`] and [`cli`]
//! are the shell.
#![forbid(unsafe_code)]

pub mod admission;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod commands;
pub mod doc;
pub mod environment;
pub mod explain;
pub mod export;
pub mod manifest;
pub mod merge;
pub mod metrics;
pub mod names;
pub mod patch;
pub mod preview;
pub mod server;
pub mod startup;
pub mod store;
pub mod suite;
pub mod supervise;
pub mod template;
pub mod tls;
pub mod yaml;
