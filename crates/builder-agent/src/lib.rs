//! The guest agent: runs one build inside the builder VM (or on any host with a Docker daemon).
//!
//! `pipeline` drives the phases; each phase lives in its own module: `git` (clone, checkout),
//! `context` + `dockerignore` (the build context), `buildkit` (the image build through
//! `docker buildx build`), `docker` (the daemon's API: pull, inspect, save), `convert`
//! (image in the daemon → rootfs, with the `builder-rootfs` crate; the upload is the `builder-s3`
//! crate's), `notify`
//! (webhook), `guest_logs` (the build's own logs handed to the node agent), `phase_events` (each
//! phase's start, signed, to the node agent). `vm` is the VM's
//! init, `log` is the build log, `error` the one error type every phase returns, `basic_auth`
//! the `user:password` form git and Docker send credentials in.

pub mod basic_auth;
pub mod buildkit;
pub mod cli;
pub mod context;
pub mod convert;
pub mod docker;
pub mod dockerignore;
pub mod error;
pub mod git;
pub mod guest_logs;
pub mod log;
pub mod notify;
pub mod phase_events;
pub mod pipeline;
pub mod process;
pub mod vm;
