//! Thumbnails: a frame rendered small, with no text burnt in (only pixels, so no patient data),
//! cached in the index.
//!
//! The cache key is the stored copy's storage key (unique per copy: a replaced instance gets a new
//! key, so its old thumbnail can never be served) plus the variant (media type and viewport). A
//! thumbnail is a pure function of that key, so generating it is idempotent: gateways sharing one
//! index that miss the cache at the same time each render the same bytes, and the insert keeps the
//! first (no claim row needed; at worst one thumbnail is rendered twice). The rows go with their
//! instance: a trigger deletes them when the instance row is deleted or its storage key changes.
//! Only ingest writes to the index, so the insert goes through [`Ingestor::cache_thumbnail`].

use super::{Output, RenderError, Renderer};
use crate::index::{Index, StoredInstance};
use crate::ingest::Ingestor;
use crate::storage::ObjectStore;

/// The cache variant of an output: its media type and the viewport it was fitted into.
pub fn variant(output: &Output) -> String {
    let side = |s: Option<u32>| s.map_or_else(|| "-".to_string(), |v| v.to_string());
    format!(
        "{}:{}x{}",
        output.format.media_type(),
        side(output.viewport.0),
        side(output.viewport.1)
    )
}

/// The thumbnail of the first frame of `inst`, from the cache or rendered (and then cached).
pub async fn thumbnail(
    renderer: &Renderer,
    index: &Index,
    ingestor: &Ingestor,
    store: &dyn ObjectStore,
    inst: &StoredInstance,
    frame: u32,
    output: Output,
) -> Result<Vec<u8>, RenderError> {
    let variant = format!("{}#{}", variant(&output), frame + 1);
    match index.thumbnail(&inst.storage_key, &variant).await {
        Ok(Some(image)) => return Ok(image),
        Ok(None) => {}
        // A cache that cannot be read only costs a render.
        Err(e) => tracing::warn!(error = %e, "thumbnail cache read failed"),
    }
    let image = renderer.render(store, inst, frame, None, output).await?;
    if let Err(e) = ingestor
        .cache_thumbnail(&inst.sop_instance_uid, &inst.storage_key, &variant, &image)
        .await
    {
        tracing::warn!(key = %inst.storage_key, error = %e, "thumbnail not cached");
    }
    Ok(image)
}
