//! What both frontends (gRPC and the OpenAI HTTP API) read from a request's headers
//! the same way: the API key and the request id.

/// Whether a request may pass: no key is configured, or its `authorization` header
/// is `Bearer <key>`.
pub(crate) fn authorized(key: Option<&str>, authorization: Option<&str>) -> bool {
    match key {
        None => true,
        Some(k) => authorization.and_then(|v| v.strip_prefix("Bearer ")) == Some(k),
    }
}

/// The request's id: the client's `x-request-id` header if it sent one, else a new one.
pub(crate) fn request_id(given: Option<&str>) -> String {
    given
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_bearer_token_passes() {
        assert!(authorized(None, None));
        assert!(authorized(None, Some("anything")));
        assert!(authorized(Some("k"), Some("Bearer k")));
        assert!(!authorized(Some("k"), None));
        assert!(!authorized(Some("k"), Some("Bearer x")));
        assert!(!authorized(Some("k"), Some("k")));
        assert!(!authorized(Some("k"), Some("bearer k")));
    }

    #[test]
    fn a_given_request_id_is_kept_else_one_is_made() {
        assert_eq!(request_id(Some("abc")), "abc");
        let (a, b) = (request_id(None), request_id(None));
        assert!(!a.is_empty() && a != b);
    }
}
