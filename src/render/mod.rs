//! Rendering of stored frames as consumer images (DICOMweb `/rendered` and `/thumbnail`, WADO-URI):
//!
//! - [`source`]: the header and the one frame asked for, read from storage by range;
//! - [`decode`]: the frame decoded (dicom-pixeldata codecs for encapsulated syntaxes) and unpacked
//!   into sample values, with [`attributes`] saying how to display them (RLE of any
//!   depth by [`crate::transcode::rle`]);
//! - [`pipeline`]: Modality LUT, VOI ([`window`], [`lut`]), MONOCHROME1, colour ([`color`]);
//! - [`encode`]: region, viewport, JPEG / PNG / GIF;
//! - [`thumbnail`]: thumbnails cached in the index.
//!
//! Decoding and encoding are CPU work: they run on blocking threads, at most
//! `[render] max_concurrent` at a time, never on the async workers.

pub mod attributes;
pub mod color;
pub mod decode;
pub mod encode;
pub mod lut;
pub mod pipeline;
pub mod source;
pub mod thumbnail;
pub mod window;

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::index::StoredInstance;
use crate::storage::{ObjectStore, StorageError};
pub use encode::{Format, Output};
pub use window::{Function, Window};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the instance has no pixel data to render")]
    NotAnImage,
    #[error("frame {frame} does not exist (the instance has {count})")]
    NoSuchFrame { frame: u32, count: u32 },
    #[error("cannot render this instance: {0}")]
    Unsupported(String),
    #[error("invalid pixel data: {0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Renders frames, a bounded number at a time.
pub struct Renderer {
    permits: Arc<Semaphore>,
    /// The default thumbnail's longest side, in pixels.
    pub thumbnail_size: u32,
}

impl Renderer {
    pub fn new(max_concurrent: usize, thumbnail_size: u32) -> Renderer {
        Renderer {
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            thumbnail_size: thumbnail_size.max(1),
        }
    }

    /// Frame `frame` (0-based) of `inst` as an image: read from storage, then decoded, passed
    /// through the display pipeline (with `window` instead of the object's, if given) and encoded
    /// on a blocking thread.
    pub async fn render(
        &self,
        store: &dyn ObjectStore,
        inst: &StoredInstance,
        frame: u32,
        window: Option<Window>,
        output: Output,
    ) -> Result<Vec<u8>, RenderError> {
        let fetched = source::fetch(store, inst, frame).await?;
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the render semaphore is never closed");
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let frame = decode::decode(fetched)?;
            let rendered = pipeline::render(frame, window)?;
            encode::encode(rendered, &output)
        })
        .await
        .map_err(|e| RenderError::Invalid(format!("rendering task failed: {e}")))?
    }
}
