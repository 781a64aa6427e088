//! Integration tests: the `hepaflow` binary and library against real files and real tools.

mod support;

mod analysis;
mod compose;
mod db;
mod hostile;
mod nifti_io;
mod phantom;
mod queue;
mod segment;
mod service;
