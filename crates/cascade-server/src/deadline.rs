//! Deadlines: the caller's `grpc-timeout`, parsed per the gRPC spec.

use std::time::Duration;

use tonic::Status;

/// Below this much remaining time a request is not started at all.
pub(crate) const MIN_BUDGET: Duration = Duration::from_millis(1);

/// The caller's remaining time, from the `grpc-timeout` request header.
///
/// The gRPC spec allows at most 8 digits and a unit (`H M S m u n`): so the
/// longest deadline is 99,999,999 hours, which an `Instant` can always add.
/// Anything else (more digits, no unit, not ASCII) is the client's error:
/// `INVALID_ARGUMENT` naming the header, never a panic further on.
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, Status> {
    let Some(raw) = meta.get("grpc-timeout") else {
        return Ok(None);
    };
    parse_grpc_timeout(raw.as_bytes()).map(Some).ok_or_else(|| {
        Status::invalid_argument(format!(
            "grpc-timeout header {:?}: expected 1 to 8 digits and a unit (H, M, S, m, u or n)",
            String::from_utf8_lossy(raw.as_bytes())
        ))
    })
}

/// The `grpc-timeout` of a request's headers, if it has a well-formed one.
pub(crate) fn header_deadline(headers: &http::HeaderMap) -> Option<Duration> {
    parse_grpc_timeout(headers.get("grpc-timeout")?.as_bytes())
}

fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // At most 8 digits: no overflow in u64, nor in the multiplications below.
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("deadline expired; the request was abandoned")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn parses_grpc_timeout_per_the_spec() {
        use tonic::Code;
        let mut m = tonic::metadata::MetadataMap::new();
        for (v, want) in [
            ("2S", Some(Duration::from_secs(2))),
            ("150m", Some(Duration::from_millis(150))),
            ("7u", Some(Duration::from_micros(7))),
            ("3M", Some(Duration::from_secs(180))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5n", Some(Duration::from_nanos(5))),
            ("99999999H", Some(Duration::from_secs(99_999_999 * 3600))),
            ("00000001S", Some(Duration::from_secs(1))),
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&m).unwrap(), want, "{v}");
            // The longest allowed deadline still fits an Instant.
            assert!(Instant::now().checked_add(want.unwrap()).is_some(), "{v}");
        }
        for v in [
            "5x",
            "S",
            "",
            "123456789S",
            "18446744073709551615S",
            "-1S",
            "+1S",
            "1.5S",
            " 1S",
        ] {
            m.insert("grpc-timeout", v.parse().unwrap());
            let e = grpc_timeout(&m).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{v}");
            assert!(e.message().contains("grpc-timeout"), "{v}: {}", e.message());
        }
        assert_eq!(
            grpc_timeout(&tonic::metadata::MetadataMap::new()).unwrap(),
            None
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]

        /// Any header bytes: a deadline that fits an `Instant`, or none.
        #[test]
        fn any_grpc_timeout_bytes_parse_or_are_refused(v in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12)) {
            if let Some(d) = parse_grpc_timeout(&v) {
                proptest::prop_assert!(d <= Duration::from_secs(99_999_999 * 3600));
                proptest::prop_assert!(Instant::now().checked_add(d).is_some());
            }
        }

        /// Every well-formed value parses to exactly its duration.
        #[test]
        fn well_formed_grpc_timeouts_parse_exactly(n in 0u64..100_000_000, unit in 0usize..6) {
            let (c, d) = [
                ('H', Duration::from_secs(n * 3600)),
                ('M', Duration::from_secs(n * 60)),
                ('S', Duration::from_secs(n)),
                ('m', Duration::from_millis(n)),
                ('u', Duration::from_micros(n)),
                ('n', Duration::from_nanos(n)),
            ][unit];
            proptest::prop_assert_eq!(parse_grpc_timeout(format!("{n}{c}").as_bytes()), Some(d));
        }
    }
}
