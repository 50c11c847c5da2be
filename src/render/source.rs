//! Reads what rendering one frame needs from storage, and nothing more: the object's header (the
//! bytes before its pixel data) and that one frame's bytes, both as ranged reads through the frame
//! layout the index recorded at ingest. An encapsulated frame's fragments come from one ranged read
//! spanning them; a native frame is its own byte range. Only an object whose frames cannot be
//! addressed by offset (a deflated data set), or whose pixel bytes need the parser's byte swapping
//! (Explicit VR Big Endian, retired), is read whole.

use bytes::{Bytes, BytesMut};

use super::RenderError;
use crate::index::StoredInstance;
use crate::ingest::layout::{Extent, Layout};
use crate::storage::{read_all, ObjectStore};

const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";

/// The stored bytes of one frame and of the header describing it.
pub struct FetchedFrame {
    pub transfer_syntax: String,
    /// The Part-10 bytes from the start of the file up to the pixel data (or the whole object, for
    /// [`FrameBytes::InObject`]).
    pub header: Bytes,
    pub frame: FrameBytes,
    /// 0-based frame number.
    pub index: u32,
}

pub enum FrameBytes {
    /// Native pixel data of one frame, as stored.
    Native(Bytes),
    /// The compressed bitstream of one frame (its fragments concatenated).
    Encapsulated(Bytes),
    /// The frame must be cut from the whole object in `header` once it is parsed.
    InObject,
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

pub fn layout_of(inst: &StoredInstance) -> Result<Layout, RenderError> {
    serde_json::from_str(&inst.frame_layout)
        .map_err(|e| RenderError::Invalid(format!("bad frame layout in the index: {e}")))
}

/// Reads frame `index` (0-based) of `inst` and its header.
pub async fn fetch(
    store: &dyn ObjectStore,
    inst: &StoredInstance,
    index: u32,
) -> Result<FetchedFrame, RenderError> {
    let layout = layout_of(inst)?;
    let key = inst.storage_key.as_str();
    if let Some(count) = frame_count(&layout) {
        if count == 0 {
            return Err(RenderError::NotAnImage);
        }
        if index >= count {
            return Err(RenderError::NoSuchFrame {
                frame: index + 1,
                count,
            });
        }
    }
    if inst.transfer_syntax_uid == EXPLICIT_VR_BE {
        let whole = read_all(store, key).await?;
        return Ok(FetchedFrame {
            transfer_syntax: inst.transfer_syntax_uid.clone(),
            header: whole.into(),
            frame: FrameBytes::InObject,
            index,
        });
    }
    let fetched = |header, frame| FetchedFrame {
        transfer_syntax: inst.transfer_syntax_uid.clone(),
        header,
        frame,
        index,
    };
    match layout {
        Layout::Native {
            value,
            frame_length,
            ..
        } => {
            let offset = value.offset + u64::from(index) * frame_length;
            let (header, frame) = tokio::try_join!(
                store.get_range(key, 0, value.offset),
                store.get_range(key, offset, frame_length)
            )?;
            Ok(fetched(header, FrameBytes::Native(frame)))
        }
        Layout::Encapsulated { frames } => {
            let fragments = &frames[index as usize];
            let first = frames
                .first()
                .and_then(|f| f.first())
                .ok_or_else(|| RenderError::Invalid("a frame without fragments".into()))?;
            let (Some(start), Some(end)) = (
                fragments.first().map(|e| e.offset),
                fragments.iter().map(Extent::end).max(),
            ) else {
                return Err(RenderError::Invalid("a frame without fragments".into()));
            };
            let (header, span) = tokio::try_join!(
                store.get_range(key, 0, first.offset),
                store.get_range(key, start, end - start)
            )?;
            let frame = if fragments.len() == 1 {
                span
            } else {
                let mut joined = BytesMut::with_capacity(
                    fragments.iter().map(|e| e.length).sum::<u64>() as usize,
                );
                for e in fragments {
                    let from = (e.offset - start) as usize;
                    joined.extend_from_slice(&span[from..from + e.length as usize]);
                }
                joined.freeze()
            };
            Ok(fetched(header, FrameBytes::Encapsulated(frame)))
        }
        Layout::Unavailable => Ok(fetched(
            read_all(store, key).await?.into(),
            FrameBytes::InObject,
        )),
        Layout::NoPixelData => Err(RenderError::NotAnImage),
    }
}
