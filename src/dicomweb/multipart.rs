//! `multipart/related` response bodies, streamed part by part (PS3.18 8.6.1.2).
//!
//! A producer task sends parts through a small bounded channel, so at most a few parts are in memory
//! whatever the size of the study, and a slow client slows the producer instead of growing a buffer.

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

/// Parts buffered between producer and client.
const CHANNEL_DEPTH: usize = 8;

pub struct MultipartWriter {
    boundary: String,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
}

impl MultipartWriter {
    /// A writer and the response body it feeds.
    pub fn new() -> (MultipartWriter, Body, String) {
        let boundary = format!("dicomgw-{}", uuid::Uuid::new_v4().simple());
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let mut rx = rx;
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed();
        (
            MultipartWriter {
                boundary: boundary.clone(),
                tx,
            },
            Body::from_stream(stream),
            boundary,
        )
    }

    /// Starts a part; returns false when the client went away.
    pub async fn start_part(&self, content_type: &str, location: Option<&str>) -> bool {
        let mut head = format!("--{}\r\nContent-Type: {content_type}\r\n", self.boundary);
        if let Some(loc) = location {
            head.push_str(&format!("Content-Location: {loc}\r\n"));
        }
        head.push_str("\r\n");
        self.send(Bytes::from(head)).await
    }

    pub async fn send(&self, bytes: Bytes) -> bool {
        self.tx.send(Ok(bytes)).await.is_ok()
    }

    pub async fn end_part(&self) -> bool {
        self.send(Bytes::from_static(b"\r\n")).await
    }

    /// Aborts the response (the client sees a truncated body rather than a silently short one).
    pub async fn fail(self, error: std::io::Error) {
        let _ = self.tx.send(Err(error)).await;
    }

    pub async fn finish(self) {
        let _ = self
            .tx
            .send(Ok(Bytes::from(format!("--{}--\r\n", self.boundary))))
            .await;
    }
}
