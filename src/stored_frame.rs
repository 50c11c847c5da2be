//! One frame of a stored instance, read from storage by range, the one frame source of rendering and
//! transcoding: the object's header (the bytes before its pixel data) and that frame's bytes (its
//! fragments, when encapsulated, from one ranged read spanning them), through the frame layout the
//! index recorded at ingest ([`crate::dicom::Layout`]). The object is never read whole here: a
//! caller that can use the whole object when the frames cannot be addressed (see
//! [`FrameError::Unaddressable`]) reads it itself.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::dicom::{Extent, Layout};
use crate::storage::{ObjectStore, StorageError};

const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// The header of a stored instance and one frame's bytes, as stored.
pub struct StoredFrame {
    /// The Part-10 bytes from the start of the object up to its pixel data.
    pub header: Bytes,
    pub bytes: FrameBytes,
}

pub enum FrameBytes {
    /// Native pixel data of one frame.
    Native(Bytes),
    /// The fragments of one encapsulated frame: ranges of `span`, in order.
    Encapsulated {
        span: Bytes,
        fragments: Vec<Range<usize>>,
    },
}

impl FrameBytes {
    /// The frame's fragments (one slice for native pixel data).
    pub fn fragments(&self) -> Vec<&[u8]> {
        match self {
            FrameBytes::Native(bytes) => vec![bytes],
            FrameBytes::Encapsulated { span, fragments } => {
                fragments.iter().map(|r| &span[r.clone()]).collect()
            }
        }
    }

    /// The frame's bytes, its fragments joined (no copy for a single fragment).
    pub fn joined(&self) -> Bytes {
        match self {
            FrameBytes::Native(bytes) => bytes.clone(),
            FrameBytes::Encapsulated { span, fragments } => match &fragments[..] {
                [one] => span.slice(one.clone()),
                several => {
                    let mut joined = BytesMut::with_capacity(several.iter().map(|r| r.len()).sum());
                    for r in several {
                        joined.extend_from_slice(&span[r.clone()]);
                    }
                    joined.freeze()
                }
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the instance has no pixel data")]
    NotAnImage,
    #[error("frame {frame} does not exist (the instance has {count})")]
    NoSuchFrame { frame: u32, count: u32 },
    /// The frames cannot be cut out by offset: a deflated data set, fragments that could not be
    /// assigned to frames, or Explicit VR Big Endian (its pixel bytes need swapping).
    #[error("the frames of this instance cannot be addressed by offset")]
    Unaddressable,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The number of frames in the recorded layout, if the layout says.
pub fn frame_count(layout: &Layout) -> Option<u32> {
    match layout {
        Layout::Native { frames, .. } => Some(*frames),
        Layout::Encapsulated { frames } => Some(frames.len() as u32),
        Layout::NoPixelData => Some(0),
        Layout::Unavailable => None,
    }
}

/// Where frame `index` (0-based) lies: its fragments, or its slice of native pixel data.
pub fn frame_extents(layout: &Layout, index: u32) -> Result<Vec<Extent>, FrameError> {
    if let Some(count) = frame_count(layout) {
        if count == 0 {
            return Err(FrameError::NotAnImage);
        }
        if index >= count {
            return Err(FrameError::NoSuchFrame {
                frame: index.saturating_add(1),
                count,
            });
        }
    }
    match layout {
        Layout::Native {
            value,
            frame_length,
            ..
        } => Ok(vec![Extent {
            offset: value.offset + u64::from(index) * frame_length,
            length: *frame_length,
        }]),
        Layout::Encapsulated { frames } => match &frames[index as usize] {
            fragments if fragments.is_empty() => {
                Err(FrameError::Invalid("a frame without fragments".into()))
            }
            fragments => Ok(fragments.clone()),
        },
        Layout::NoPixelData => Err(FrameError::NotAnImage),
        Layout::Unavailable => Err(FrameError::Unaddressable),
    }
}

/// Where the pixel data's first byte lies: everything before it is the header.
fn pixel_data_offset(layout: &Layout) -> Option<u64> {
    match layout {
        Layout::Native { value, .. } => Some(value.offset),
        Layout::Encapsulated { frames } => frames.first()?.first().map(|e| e.offset),
        Layout::NoPixelData | Layout::Unavailable => None,
    }
}

/// Reads frame `index` (0-based) of the object stored under `key` (of transfer syntax `ts_uid`,
/// frames laid out as `layout`) and its header: two ranged reads, run together.
pub async fn fetch(
    store: &dyn ObjectStore,
    key: &str,
    ts_uid: &str,
    layout: &Layout,
    index: u32,
) -> Result<StoredFrame, FrameError> {
    let extents = frame_extents(layout, index)?;
    if ts_uid == EXPLICIT_VR_BE {
        return Err(FrameError::Unaddressable);
    }
    let header_end = pixel_data_offset(layout).ok_or(FrameError::Unaddressable)?;
    let start = extents[0].offset;
    let end = extents.iter().map(Extent::end).max().unwrap_or(start);
    let (header, span) = tokio::try_join!(
        store.get_range(key, 0, header_end),
        store.get_range(key, start, end - start)
    )?;
    let bytes = match layout {
        Layout::Native { .. } => FrameBytes::Native(span),
        _ => {
            let fragments = extents
                .iter()
                .map(|e| {
                    let from = e.offset.checked_sub(start)? as usize;
                    let range = from..from + e.length as usize;
                    (range.end <= span.len()).then_some(range)
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| FrameError::Invalid("fragments out of order".into()))?;
            FrameBytes::Encapsulated { span, fragments }
        }
    };
    Ok(StoredFrame { header, bytes })
}
