//! The transcoder: one stored instance, or one frame of it, re-encoded into another transfer
//! syntax for WADO-RS, WADO-URI and C-MOVE / C-GET receivers.
//!
//! Decodes every compressed syntax dicom-pixeldata has a codec for (JPEG baseline, extended and
//! lossless; JPEG-LS; JPEG 2000 and HTJ2K through OpenJPEG; RLE; deflate) and writes Explicit or
//! Implicit VR Little Endian, or JPEG-LS lossless (CharLS). Work is done frame by frame: at most the
//! stored instance and one decoded frame are in memory, and output is handed on as it is made.
//! Decoding is CPU work: it runs on blocking threads, no more at once than there are CPUs, so a
//! burst of transcoding requests queues instead of starving everything else.

mod frame;
mod object;
pub mod rle;
mod syntax;

use std::sync::OnceLock;

use bytes::Bytes;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use tokio::sync::{mpsc, Semaphore};

use frame::PixelHeader;
pub use object::Form;
pub use syntax::{can_decode, check, is_lossy, is_native};

use crate::dicom::Layout;
use crate::index::StoredInstance;
use crate::storage::{read_all, ObjectStore, StorageError};
use crate::stored_frame::{self, FrameError};

pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
pub const JPEG_LS_LOSSLESS: &str = "1.2.840.10008.1.2.4.80";

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The requested syntax cannot be produced from this object (HTTP 406; a failed sub-operation).
    #[error("{0}")]
    Refused(String),
    /// The stored object could not be read, decoded or encoded.
    #[error("transcoding failed: {0}")]
    Failed(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Pieces handed between the blocking transcoder and its async consumer.
const PIECES_AHEAD: usize = 2;

/// Runs CPU-bound codec work on a blocking thread, at most one per CPU at a time.
pub async fn run_blocking<T, F>(work: F) -> Result<T, TranscodeError>
where
    F: FnOnce() -> Result<T, TranscodeError> + Send + 'static,
    T: Send + 'static,
{
    let _permit = permits()
        .acquire()
        .await
        .map_err(|e| TranscodeError::Failed(e.to_string()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| TranscodeError::Failed(format!("transcoder panicked: {e}")))?
}

fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS
        .get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// Transcodes a stored Part-10 object (already read, with the frame layout ingest recorded for it)
/// into `target`, streaming: the receiver yields the output piece by piece, then an error if the
/// work failed part-way. Dropping the receiver stops the work.
pub fn stream(
    object: Vec<u8>,
    layout: Layout,
    target: String,
    form: Form,
) -> mpsc::Receiver<Result<Bytes, TranscodeError>> {
    let (tx, rx) = mpsc::channel(PIECES_AHEAD);
    tokio::spawn(async move {
        let sender = tx.clone();
        let result = run_blocking(move || {
            object::transcode(&object, &layout, &target, form, &mut |piece| {
                sender.blocking_send(Ok(Bytes::from(piece))).is_ok()
            })
        })
        .await;
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

/// Transcodes one stored instance into a Part-10 object in `target` (for WADO-URI and other
/// callers that want the whole object): read from storage, converted, returned in one piece.
pub async fn instance(
    store: &dyn ObjectStore,
    inst: &StoredInstance,
    target: &str,
) -> Result<Vec<u8>, TranscodeError> {
    check(&inst.transfer_syntax_uid, target)?;
    let object = read_all(store, &inst.storage_key).await?;
    whole(object, &inst.frame_layout, target, Form::Part10).await
}

/// A stored object (already read; `layout`: its recorded frame layout, JSON) as a bare data set in
/// `target`, as a C-STORE sub-operation sends it.
pub async fn dataset(
    object: Vec<u8>,
    layout: &str,
    target: &str,
) -> Result<Vec<u8>, TranscodeError> {
    whole(object, layout, target, Form::Dataset).await
}

async fn whole(
    object: Vec<u8>,
    layout: &str,
    target: &str,
    form: Form,
) -> Result<Vec<u8>, TranscodeError> {
    let layout = parse_layout(layout)?;
    let target = target.to_string();
    run_blocking(move || {
        let mut out = Vec::with_capacity(object.len());
        object::transcode(&object, &layout, &target, form, &mut |piece| {
            out.extend_from_slice(&piece);
            true
        })?;
        Ok(out)
    })
    .await
}

/// Reads the frame layout recorded in the index.
pub fn parse_layout(json: &str) -> Result<Layout, TranscodeError> {
    serde_json::from_str(json).map_err(|e| TranscodeError::Failed(format!("bad frame layout: {e}")))
}

/// Frame `index` (0-based) of a stored instance whose frames can be addressed, in `target`: native
/// little endian samples for a native target, else the encoded frame. Only the object's header and
/// the frame's own bytes are read from storage.
pub async fn frame(
    store: &dyn ObjectStore,
    inst: &StoredInstance,
    layout: &Layout,
    index: usize,
    target: &str,
) -> Result<Vec<u8>, TranscodeError> {
    let stored = inst.transfer_syntax_uid.clone();
    check(&stored, target)?;
    if stored == syntax::EXPLICIT_VR_BE {
        return Err(TranscodeError::Refused(
            "the frames of a big endian instance cannot be addressed for transcoding".into(),
        ));
    }
    let frame = stored_frame::fetch(
        store,
        &inst.storage_key,
        &stored,
        layout,
        u32::try_from(index).unwrap_or(u32::MAX),
    )
    .await
    .map_err(frame_error)?;
    let target = target.to_string();
    run_blocking(move || make_frame(&stored, &frame.header, &frame.bytes.fragments(), &target))
        .await
}

/// As [`frame`], for a native Explicit VR Little Endian object already in memory (the copy made of
/// a deflated or big endian one) and its layout.
pub async fn frame_of_copy(
    object: Bytes,
    layout: &Layout,
    index: usize,
    target: &str,
) -> Result<Vec<u8>, TranscodeError> {
    check(EXPLICIT_VR_LE, target)?;
    let extents = stored_frame::frame_extents(layout, u32::try_from(index).unwrap_or(u32::MAX))
        .map_err(frame_error)?;
    let target = target.to_string();
    run_blocking(move || {
        let slice = |e: &crate::dicom::Extent| {
            object
                .get(e.offset as usize..e.end() as usize)
                .ok_or_else(|| TranscodeError::Failed("frame outside the object".into()))
        };
        let head = &object[..extents[0].offset as usize];
        let parts = extents.iter().map(slice).collect::<Result<Vec<_>, _>>()?;
        make_frame(EXPLICIT_VR_LE, head, &parts, &target)
    })
    .await
}

/// What the frame source's refusals mean for transcoding.
fn frame_error(e: FrameError) -> TranscodeError {
    match e {
        FrameError::NotAnImage | FrameError::Unaddressable => TranscodeError::Refused(
            "the frames of this instance cannot be addressed for transcoding".into(),
        ),
        FrameError::NoSuchFrame { frame, .. } => {
            TranscodeError::Failed(format!("no frame {frame}"))
        }
        FrameError::Invalid(e) => TranscodeError::Failed(e),
        FrameError::Storage(e) => TranscodeError::Storage(e),
    }
}

/// One frame in `target`, from the object's header (`head`: everything before the frame) and the
/// frame's bytes in the stored syntax.
fn make_frame(
    stored: &str,
    head: &[u8],
    parts: &[&[u8]],
    target: &str,
) -> Result<Vec<u8>, TranscodeError> {
    let header = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(head)
        .map_err(|e| TranscodeError::Failed(format!("unreadable stored object: {e}")))?;
    let mut pixels = PixelHeader::from_dataset(&header)?;
    let native = if is_native(stored) {
        parts.concat()
    } else {
        frame::decode(stored, &pixels, parts)?
    };
    if is_native(target) {
        return Ok(native);
    }
    if syntax::is_lossless_only(target) && syntax::was_lossy(stored, &header) {
        return Err(TranscodeError::Refused(
            "the instance was lossy compressed; a lossless frame cannot be made from it".into(),
        ));
    }
    if !is_native(stored) && pixels.samples_per_pixel > 1 && syntax::decoder_outputs_rgb(stored) {
        pixels.photometric_interpretation = "RGB".into();
    }
    let planar = is_native(stored)
        && header
            .get(tags::PLANAR_CONFIGURATION)
            .and_then(|e| e.to_int::<u16>().ok())
            == Some(1);
    frame::encode(target, &pixels, &native, planar)
}
