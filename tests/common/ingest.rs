//! What a stock Infisical sends herald's ingest: its webhooks, signed as
//! it signs them, and messages on its Redis bus in the shape its servers
//! publish.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

/// Infisical's Redis channel.
pub const CHANNEL: &str = "infisical::core-servers";

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Infisical's webhook body for a change (`JSON.stringify` of
/// `{...payload, timestamp}`: compact, in this key order).
pub fn webhook_body(path: &str, timestamp: u64) -> String {
    json!({
        "event": "secrets.modified",
        "project": {
            "workspaceId": "p1", "projectId": "p1", "projectName": "Project one",
            "environment": "prod", "environmentName": "Production",
            "secretPath": path, "changedBy": "someone@example.com", "changedByActorType": "user"
        },
        "timestamp": timestamp
    })
    .to_string()
}

/// `x-infisical-signature` for `body`.
pub fn signature(secret: &str, body: &str, timestamp: u64) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(body.as_bytes());
    let hex: String = m
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp};{hex}")
}

/// A message as recent Infisical servers publish it on the channel.
pub fn bus_message(ty: &str, path: &str, keys: &[&str], container: &str) -> Vec<u8> {
    let mut payload =
        json!({"type": ty, "environment": "prod", "secretPath": path, "projectId": "p1"});
    if ty != "secret:import-mutation" {
        payload["secretKeys"] = json!(keys);
    }
    json!({
        "type": "secret.mutation",
        "timestamp": format!("2026-12-02T07:00:00.{:03}Z", now_ms() % 1000),
        "sourceContainer": container,
        "payload": payload
    })
    .to_string()
    .into_bytes()
}
