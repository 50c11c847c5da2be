//! Reads what rendering one frame needs from storage, and nothing more: the object's header and that
//! one frame's bytes, through the frame source ([`crate::stored_frame`]). Only an object whose
//! frames cannot be addressed by offset (a deflated data set), or whose pixel bytes need the
//! parser's byte swapping (Explicit VR Big Endian, retired), is read whole.

use bytes::Bytes;

use super::RenderError;
use crate::dicom::Layout;
use crate::index::StoredInstance;
use crate::storage::{read_all, ObjectStore};
pub use crate::stored_frame::frame_count;
use crate::stored_frame::{self, FrameError, StoredFrame};

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
    let fetched = |header, frame| FetchedFrame {
        transfer_syntax: inst.transfer_syntax_uid.clone(),
        header,
        frame,
        index,
    };
    match stored_frame::fetch(store, key, &inst.transfer_syntax_uid, &layout, index).await {
        Ok(StoredFrame { header, bytes }) => Ok(fetched(
            header,
            match bytes {
                stored_frame::FrameBytes::Native(frame) => FrameBytes::Native(frame),
                encapsulated => FrameBytes::Encapsulated(encapsulated.joined()),
            },
        )),
        Err(FrameError::Unaddressable) => Ok(fetched(
            read_all(store, key).await?.into(),
            FrameBytes::InObject,
        )),
        Err(FrameError::NotAnImage) => Err(RenderError::NotAnImage),
        Err(FrameError::NoSuchFrame { frame, count }) => {
            Err(RenderError::NoSuchFrame { frame, count })
        }
        Err(FrameError::Invalid(e)) => Err(RenderError::Invalid(e)),
        Err(FrameError::Storage(e)) => Err(e.into()),
    }
}
