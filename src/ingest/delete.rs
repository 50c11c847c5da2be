//! Deletion of stored instances (DICOMweb DELETE): the index rows go first, in one transaction, then
//! the objects, so that no row ever points at a missing object. The objects' keys are logged in
//! storage first ([`crate::storage::ObjectStore::intend_blocking`]): if the process dies after the
//! (flushed) commit but before the objects are deleted, start-up reconcile finds them and indexes
//! them again (the unacknowledged deletion is then undone whole, not left half-way as unindexed
//! objects).

use futures::StreamExt;

use super::Ingestor;
use crate::audit::Origin;
use crate::index::{Scope, WriteError};

/// Objects deleted from storage at once.
const DELETE_CONCURRENCY: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Instances removed from the index.
    pub instances: usize,
    /// Of those, objects that storage failed to delete. They have no row any more, so the next start's
    /// reconcile would index them again: the caller must report them.
    pub objects_left: usize,
}

impl Ingestor {
    /// Deletes the instances in `scope`; the deletion's audit event (who: `by`) commits with the
    /// rows' removal.
    pub async fn delete(&self, scope: Scope, by: Origin) -> Result<Removal, WriteError> {
        let before: Vec<String> = self
            .index
            .stored_instances(
                &scope.study_uid,
                scope.series_uid.as_deref(),
                scope.sop_instance_uid.as_deref(),
            )
            .await?
            .into_iter()
            .map(|i| i.storage_key)
            .collect();
        self.intend(before.clone()).await?;
        let deleted = self.index.delete(scope, Some(by)).await;
        let keys = match deleted {
            Ok(keys) => keys,
            Err(e) => {
                self.settle(&before);
                return Err(e);
            }
        };
        // An instance stored into the scope between the lookup and the commit.
        let late: Vec<String> = keys
            .iter()
            .filter(|k| !before.contains(k))
            .cloned()
            .collect();
        if !late.is_empty() {
            self.intend(late.clone()).await?;
        }
        let instances = keys.len();
        let objects_left = futures::stream::iter(keys)
            .map(|key| async move {
                let result = self.store.delete(&key).await;
                if let Err(e) = &result {
                    tracing::error!(key, error = %e, "object of a deleted instance not deleted");
                }
                result.is_err()
            })
            .buffer_unordered(DELETE_CONCURRENCY)
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await;
        self.settle(&before);
        self.settle(&late);
        Ok(Removal {
            instances,
            objects_left,
        })
    }
}

impl Ingestor {
    async fn intend(&self, keys: Vec<String>) -> Result<(), WriteError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            store.intend_blocking(&keys)
        })
        .await
        .expect("intent task panicked")
        .map_err(|e| WriteError::Database(format!("cannot log the deletion: {e}")))
    }

    fn settle(&self, keys: &[String]) {
        for key in keys {
            self.store.settle(key);
        }
    }
}
