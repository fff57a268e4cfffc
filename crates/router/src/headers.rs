//! What the frontends read from a request's headers: the API key and the request id
//! (both alike), and gRPC's `grpc-timeout`.

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

/// A `grpc-timeout` header's value in milliseconds (rounded up; at least 1), or
/// `None` when it does not follow gRPC's format: up to 8 digits and a unit of `H`,
/// `M`, `S`, `m`, `u` or `n`.
pub(crate) fn grpc_timeout_ms(value: &str) -> Option<u32> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let ns_per_unit: u64 = match unit {
        "H" => 3_600_000_000_000,
        "M" => 60_000_000_000,
        "S" => 1_000_000_000,
        "m" => 1_000_000,
        "u" => 1_000,
        "n" => 1,
        _ => return None,
    };
    let ms = (u128::from(n) * u128::from(ns_per_unit)).div_ceil(1_000_000);
    Some(ms.clamp(1, u32::MAX.into()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_read_in_every_unit() {
        assert_eq!(grpc_timeout_ms("250m"), Some(250));
        assert_eq!(grpc_timeout_ms("2S"), Some(2000));
        assert_eq!(grpc_timeout_ms("1M"), Some(60_000));
        assert_eq!(grpc_timeout_ms("1H"), Some(3_600_000));
        assert_eq!(grpc_timeout_ms("1500u"), Some(2));
        assert_eq!(grpc_timeout_ms("5n"), Some(1));
        assert_eq!(grpc_timeout_ms("99999999H"), Some(u32::MAX));
        for bad in ["", "S", "10", "10s", "123456789m", "-1S", "1.5S"] {
            assert_eq!(grpc_timeout_ms(bad), None, "{bad}");
        }
    }

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
