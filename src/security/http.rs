//! The [`Identity`] of every HTTP request, put into its extensions before any handler runs, so that
//! handlers, the policy and the audit trail read it with `Extension<Identity>`.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;

use super::Identity;

/// Identifies the caller (for now: anonymous, by address).
pub async fn identify(request: Request, next: Next) -> Response {
    let mut request = request;
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    request
        .extensions_mut()
        .insert(Identity::anonymous(address));
    next.run(request).await
}
