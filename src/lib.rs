//! promptgate: an edge guard for AI agents.
//!
//! A request's way: socket line → [`protocol`] (decode) → [`server`]
//! (connection, queue, limits) → [`engine`] (its own thread: template, tokens,
//! KV cache, forward pass, label logits) → score → back the same way.
//! [`registry`] decides which file serves and swaps models; [`listener`] gets the socket;
//! [`app`] wires the subcommands.

#![warn(missing_docs)]

pub mod app;
pub mod bench;
pub mod config;
pub mod detector;
pub mod engine;
pub mod listener;
pub mod normalize;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod systemd;
