//! Integration tests: the `hepaflow` binary and library against real files and real tools.

mod support;

mod analysis;
mod compose;
mod db;
mod hostile;
mod mail;
mod nifti_io;
mod phantom;
mod queue;
mod report;
mod segment;
mod service;
mod web;
