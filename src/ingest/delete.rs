//! Deletion of stored instances (DICOMweb DELETE): the index rows go first, in one transaction, then
//! the objects, so that no row ever points at a missing object.

use futures::StreamExt;

use super::Ingestor;
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
    pub async fn delete(&self, scope: Scope) -> Result<Removal, WriteError> {
        let keys = self.index.delete(scope).await?;
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
        Ok(Removal {
            instances,
            objects_left,
        })
    }
}
