//! The JSON answers of Ferry's own HTTP API: compact, as APIs answer, and ending with a newline,
//! so that `curl` leaves the shell's prompt on a line of its own. (The Consul-compatible API
//! answers as Consul does.)

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

/// A value answered as one line of JSON.
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(mut body) => {
                body.push(b'\n');
                ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
            }
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding JSON: {error}\n")).into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_is_one_line_of_json() {
        let response = Json(serde_json::json!({ "a": [1, 2] })).into_response();
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), 1024).await.expect("body");
        assert_eq!(&body[..], b"{\"a\":[1,2]}\n");
    }
}
