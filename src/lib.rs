//! # sglora
//!
//! Semantic-guided LoRA generation (SG-LoRA) for edge devices: a text description of a task goes
//! in, a ready-to-load PEFT LoRA adapter comes out, with no user data and no training on the
//! device. See `ARCHITECTURE.md` for how the modules fit together.
//!
//! ```no_run
//! use sglora::{GenerateOptions, Generator};
//! let g = Generator::load("models/default")?;
//! let out = g.generate_to("Given an animal, find its broader category.", &GenerateOptions::default(),
//!                         std::path::Path::new("adapter"), false)?;
//! println!("{:?}", out.explanation.experts);
//! # Ok::<(), sglora::Error>(())
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod bert;
pub mod bundle;
pub mod cache;
pub mod config;
pub mod cvae;
pub mod daemon;
pub mod dbus;
pub mod dropbox;
pub mod encoder;
pub mod error;
pub mod experts;
pub mod generator;
pub mod kernels;
pub mod log;
mod onnx_graph;
pub mod prior;
pub mod rng;
pub mod service;
pub mod tokenizer;

pub use error::{Error, Result};
pub use generator::{GenerateOptions, Generation, Generator};
