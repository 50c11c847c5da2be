//! `dicom-gateway reindex`: rebuilds the index from what is in storage (either backend), for disaster
//! recovery or for moving to a new index. Every stored object the index does not already point at
//! goes through ingest (`Ingestor::index_stored_object`), as the start-up reconcile does.
//!
//! Memory stays flat whatever the store holds: keys are streamed from the listing, whether a key is
//! indexed is asked of the index one key at a time, and at most `CONCURRENCY` objects are in flight.
//! Meant to run while no gateway serves the same index.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::StreamExt;

use crate::config::Config;
use crate::index::Index;
use crate::ingest::{Ingestor, Outcome};
use crate::storage::sop_instance_uid_of_key;

/// Objects read and indexed at once.
const CONCURRENCY: usize = 4;
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Counts {
    listed: AtomicU64,
    indexed: AtomicU64,
    already: AtomicU64,
    superseded: AtomicU64,
    failed: AtomicU64,
}

impl Counts {
    fn line(&self, started: Instant) -> String {
        let listed = self.listed.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        format!(
            "{listed} objects ({:.0}/s): {} indexed, {} already indexed, {} superseded copies removed, {} failed",
            listed as f64 / secs.max(0.001),
            self.indexed.load(Ordering::Relaxed),
            self.already.load(Ordering::Relaxed),
            self.superseded.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let (store, index) = crate::app::open_store_and_index(&config).await?;
    store.health().await.context("storage is not reachable")?;
    let spool_dir = config.spool_path();
    let ingestor = Ingestor::new(
        store.clone(),
        index.clone(),
        config.dimse.on_duplicate,
        spool_dir,
    )?;

    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let progress = {
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("reindex: {}", counts.line(started));
            }
        })
    };
    let mut listing_error = None;
    let mut keys = store.list();
    let work = futures::stream::poll_fn(|cx| keys.poll_next_unpin(cx))
        .filter_map(|key| {
            let key = match key {
                Ok(key) => Some(key),
                Err(e) => {
                    listing_error = Some(e);
                    None
                }
            };
            std::future::ready(key)
        })
        .map(|key| reindex_one(&index, &ingestor, &counts, key))
        .buffer_unordered(CONCURRENCY);
    work.for_each(|()| std::future::ready(())).await;
    progress.abort();
    eprintln!(
        "reindex finished in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        counts.line(started)
    );
    if let Some(e) = listing_error {
        bail!("listing storage failed, the index is incomplete: {e}");
    }
    let failed = counts.failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} stored objects could not be indexed (see the log)");
    }
    Ok(())
}

async fn reindex_one(index: &Index, ingestor: &Ingestor, counts: &Counts, key: String) {
    counts.listed.fetch_add(1, Ordering::Relaxed);
    if let Some(uid) = sop_instance_uid_of_key(&key) {
        match index.storage_key_of(uid).await {
            Ok(Some(indexed)) if indexed == key => {
                counts.already.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(key, error = %e, "reindex: cannot read index");
                counts.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    match ingestor.index_stored_object(&key).await {
        Ok(Outcome::DuplicateKept) => counts.superseded.fetch_add(1, Ordering::Relaxed),
        Ok(_) => counts.indexed.fetch_add(1, Ordering::Relaxed),
        Err(e) => {
            tracing::error!(key, error = %e, "reindex: cannot index stored object");
            counts.failed.fetch_add(1, Ordering::Relaxed)
        }
    };
}
