//! hepaflow: liver-tumour reports from abdominal CT.
//!
//! # Layout
//! Dependencies point one way: faces (`cli`, `web`) → `pipeline` → services → the pure
//! imaging core.
//!
//! - [`volume`]: CT volumes and label masks with their geometry, NIfTI reading (validated,
//!   bounded) and writing, and synthetic CT phantoms.
//! - [`lesions`]: connected components, lesion measurements, mask post-processing (pure).
//! - [`metrics`]: overlap, surface and detection metrics, batch aggregation (pure).
//! - [`segment`]: the VGG16 patch classifier on libtorch: training, dense and patch
//!   inference, reassembly into a label mask.
//! - [`store`]: PostgreSQL (external or embedded), queries by entity, the artifact store.
//! - [`queue`]: the job queue, workers and the cron scheduler.
//! - [`pipeline`]: the study pipeline, one job per step.
//! - [`report`], [`notify`]: HTML reports and digests; the email outbox.
//! - [`web`]: the dashboard (axum).
//! - [`config`]: settings from the environment, with embedded defaults.
//! - [`cli`]: the command-line interface; the composition root.
//! - [`fsutil`]: atomic file writes.

pub mod cli;
pub mod config;
pub mod fsutil;
pub mod lesions;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod queue;
pub mod report;
pub mod segment;
pub mod store;
pub mod volume;
pub mod web;
