//! The one retry policy of every remote call that must survive a hiccup of its server: the
//! guest's S3 requests (each part, create and complete of a multipart upload) and both
//! webhooks (the guest's report, the node's requester webhook).
//!
//! A [`RetryPolicy`] is a number of attempts and an exponential backoff: the wait after the
//! n-th failed attempt is drawn uniformly from `[0, min(max_delay, first_delay · 2^(n-1))]`.
//! That is AWS's *full jitter* ("Exponential Backoff And Jitter", AWS Architecture Blog): of
//! the usual variants it spreads clients that failed together (the parts of one upload in
//! flight at once, the webhooks of builds that ended while a receiver restarted) the most, and
//! needs no state between attempts, unlike decorrelated jitter, whose next wait depends on the
//! previous one. The price is that a wait may be short; the attempt count, not the wait, bounds
//! how often a server is asked.
//!
//! [`retry`] drives an operation: the caller's classifier says whether an error is worth
//! another attempt ([`Verdict`]; [`Verdict::for_http_status`] is the HTTP rule every caller
//! shares, honouring a server's `Retry-After`), a hook sees every retry ([`Retrying`], which
//! words the log line the same way for every caller), and the result says how many attempts
//! were made and why they stopped ([`GaveUp`]).

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often and how far apart an operation is attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (0 counts as 1).
    pub attempts: u32,
    /// The ceiling of the wait after the first failure; it doubles with every further one.
    pub first_delay: Duration,
    /// The ceiling no wait exceeds, `Retry-After` included.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// The webhooks' policy: 6 attempts, waits of at most 1, 2, 4, 8 and 16 s (about 15 s
    /// expected in all), enough to ride out a receiver's restart without holding a build's
    /// end for minutes.
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The ceiling of the wait after failed attempt `attempt` (1-based):
    /// `min(max_delay, first_delay · 2^(attempt-1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.first_delay
            .checked_mul(1 << doublings)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The wait after failed attempt `attempt` for a given random number: `random` scaled from
    /// `[0, u64::MAX]` onto `[0, ceiling(attempt)]`.
    pub fn jittered(&self, attempt: u32, random: u64) -> Duration {
        self.ceiling(attempt)
            .mul_f64(random as f64 / u64::MAX as f64)
    }

    /// The wait after failed attempt `attempt`, drawn from the OS's random source.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.jittered(attempt, random_u64())
    }
}

/// 64 random bits; the clock's nanoseconds when the OS's source fails (a wait needs spread,
/// not secrecy).
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    match getrandom::getrandom(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
            .wrapping_mul(2_654_435_761)
            .into(),
    }
}

/// Whether a failed attempt is worth another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Another attempt would fail the same way (a refusal, bad input).
    Final,
    /// Transient: retry after the policy's wait.
    Retry,
    /// Transient, and the server asked to wait at least this long (`Retry-After`).
    RetryAfter(Duration),
}

impl Verdict {
    /// The HTTP rule of every caller: 5xx, 408 (request timeout) and 429 (too many requests)
    /// are transient, every other status is final. `retry_after` is the response's
    /// `Retry-After` header; its delay-seconds form is honoured, an HTTP date is treated as
    /// absent.
    pub fn for_http_status(status: u16, retry_after: Option<&str>) -> Verdict {
        if !(status >= 500 || status == 408 || status == 429) {
            return Verdict::Final;
        }
        match retry_after.and_then(|value| value.trim().parse::<u64>().ok()) {
            Some(seconds) => Verdict::RetryAfter(Duration::from_secs(seconds)),
            None => Verdict::Retry,
        }
    }
}

/// A failed attempt that will be retried, as the hook of [`retry`] sees it.
#[derive(Debug)]
pub struct Retrying<'a, E> {
    /// The attempt that failed (1-based).
    pub attempt: u32,
    /// Attempts in all.
    pub attempts: u32,
    pub error: &'a E,
    /// The wait before the next attempt.
    pub delay: Duration,
}

impl<E> Retrying<'_, E> {
    /// The log line every caller writes: `attempt N of M failed: ERROR; retrying in X s`.
    pub fn describe(&self, error: &str) -> String {
        format!(
            "attempt {} of {} failed: {error}; retrying in {:.1} s",
            self.attempt,
            self.attempts,
            self.delay.as_secs_f64()
        )
    }
}

/// Why [`retry`] stopped without a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The classifier called the error final.
    Final,
    /// Every attempt failed with a transient error.
    Exhausted,
}

/// The last error of an operation that did not succeed, and how it ended.
#[derive(Debug)]
pub struct GaveUp<E> {
    /// Attempts made.
    pub attempts: u32,
    pub stop: Stop,
    pub error: E,
}

/// Runs `operation` (given the attempt number, 1-based) until it succeeds, `classify` calls its
/// error [`Verdict::Final`], or `policy.attempts` are used up. Before each retry `on_retry`
/// sees the failure and the wait, then the wait passes: the policy's jittered delay, or the
/// server's `Retry-After` when longer, never more than `max_delay`.
pub async fn retry<T, E, Fut>(
    policy: &RetryPolicy,
    mut operation: impl FnMut(u32) -> Fut,
    classify: impl Fn(&E) -> Verdict,
    mut on_retry: impl FnMut(&Retrying<'_, E>),
) -> Result<T, GaveUp<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let attempts = policy.attempts.max(1);
    let mut attempt = 1;
    loop {
        let error = match operation(attempt).await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let delay = match classify(&error) {
            Verdict::Final => {
                return Err(GaveUp {
                    attempts: attempt,
                    stop: Stop::Final,
                    error,
                })
            }
            _ if attempt >= attempts => {
                return Err(GaveUp {
                    attempts: attempt,
                    stop: Stop::Exhausted,
                    error,
                })
            }
            Verdict::Retry => policy.delay(attempt),
            Verdict::RetryAfter(after) => policy.delay(attempt).max(after).min(policy.max_delay),
        };
        on_retry(&Retrying {
            attempt,
            attempts,
            error: &error,
            delay,
        });
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Instant;

    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        attempts: 4,
        first_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
    };

    /// A policy whose waits are too short to slow the tests down.
    const FAST: RetryPolicy = RetryPolicy {
        attempts: 4,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };

    #[test]
    fn ceiling_doubles_from_the_first_delay_up_to_the_max() {
        let ceilings: Vec<u128> = (1..=6).map(|n| POLICY.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 500, 500, 500]);
        // No overflow however many attempts a policy allows.
        assert_eq!(POLICY.ceiling(u32::MAX), POLICY.max_delay);
        let huge = RetryPolicy {
            first_delay: Duration::from_secs(u64::MAX / 2),
            max_delay: Duration::from_secs(60),
            ..POLICY
        };
        assert_eq!(huge.ceiling(40), Duration::from_secs(60));
    }

    #[test]
    fn jitter_spans_zero_to_the_ceiling() {
        assert_eq!(POLICY.jittered(2, 0), Duration::ZERO);
        assert_eq!(POLICY.jittered(2, u64::MAX), Duration::from_millis(200));
        assert_eq!(POLICY.jittered(2, u64::MAX / 2).as_millis(), 100);
        for attempt in 1..10 {
            for _ in 0..100 {
                assert!(POLICY.delay(attempt) <= POLICY.ceiling(attempt));
            }
        }
    }

    #[test]
    fn drawn_delays_spread_over_the_whole_range() {
        let samples: Vec<f64> = (0..2000)
            .map(|_| POLICY.delay(3).as_secs_f64() / POLICY.ceiling(3).as_secs_f64())
            .collect();
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        assert!(
            (0.45..0.55).contains(&mean),
            "mean {mean} of a uniform [0, 1]"
        );
        // Every tenth of the range is hit: no clustering, no fixed delay.
        for decile in 0..10 {
            let low = f64::from(decile) / 10.0;
            let hits = samples
                .iter()
                .filter(|s| (low..low + 0.1).contains(*s))
                .count();
            assert!(hits > 100, "{hits} samples in [{low}, {low}+0.1)");
        }
    }

    #[test]
    fn http_statuses_classify_and_retry_after_is_read() {
        for status in [500, 502, 503, 504, 408, 429] {
            assert_eq!(Verdict::for_http_status(status, None), Verdict::Retry);
        }
        for status in [200, 301, 400, 401, 403, 404, 409, 413] {
            assert_eq!(Verdict::for_http_status(status, None), Verdict::Final);
        }
        assert_eq!(
            Verdict::for_http_status(503, Some(" 7 ")),
            Verdict::RetryAfter(Duration::from_secs(7))
        );
        assert_eq!(
            Verdict::for_http_status(429, Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            Verdict::Retry
        );
        assert_eq!(Verdict::for_http_status(404, Some("7")), Verdict::Final);
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let calls = Cell::new(0);
        let mut retries = Vec::new();
        let result = retry(
            &FAST,
            |attempt| {
                calls.set(calls.get() + 1);
                assert_eq!(attempt, calls.get(), "attempts are numbered from 1");
                async move {
                    if attempt < 3 {
                        Err(format!("boom {attempt}"))
                    } else {
                        Ok(attempt * 10)
                    }
                }
            },
            |_| Verdict::Retry,
            |r| retries.push((r.attempt, r.attempts, r.error.clone(), r.delay)),
        )
        .await;
        assert_eq!(result.unwrap(), 30);
        assert_eq!(calls.get(), 3);
        assert_eq!(retries.len(), 2);
        for (n, (attempt, attempts, error, delay)) in retries.into_iter().enumerate() {
            let n = n as u32 + 1;
            assert_eq!((attempt, attempts), (n, 4));
            assert_eq!(error, format!("boom {n}"));
            assert!(delay <= FAST.ceiling(n));
        }
    }

    #[tokio::test]
    async fn exhausted_attempts_return_the_last_error() {
        let calls = Cell::new(0);
        let mut hooks = 0;
        let result: Result<(), _> = retry(
            &FAST,
            |attempt| {
                calls.set(calls.get() + 1);
                async move { Err(attempt) }
            },
            |_| Verdict::Retry,
            |_| hooks += 1,
        )
        .await;
        let gave_up = result.unwrap_err();
        assert_eq!(
            (gave_up.attempts, gave_up.stop, gave_up.error),
            (4, Stop::Exhausted, 4)
        );
        assert_eq!(calls.get(), 4);
        assert_eq!(hooks, 3, "no retry announced after the last attempt");
    }

    #[tokio::test]
    async fn a_final_error_stops_at_once() {
        let calls = Cell::new(0);
        let result: Result<(), _> = retry(
            &FAST,
            |attempt| {
                calls.set(calls.get() + 1);
                async move { Err(if attempt == 2 { 404 } else { 503 }) }
            },
            |status: &u16| Verdict::for_http_status(*status, None),
            |_| {},
        )
        .await;
        let gave_up = result.unwrap_err();
        assert_eq!(
            (gave_up.attempts, gave_up.stop, gave_up.error),
            (2, Stop::Final, 404)
        );
        assert_eq!(calls.get(), 2);
    }

    #[tokio::test]
    async fn zero_attempts_still_make_one() {
        let policy = RetryPolicy {
            attempts: 0,
            ..FAST
        };
        let result: Result<(), _> =
            retry(&policy, |_| async { Err(()) }, |_| Verdict::Retry, |_| {}).await;
        assert_eq!(result.unwrap_err().attempts, 1);
    }

    #[tokio::test]
    async fn retry_after_is_waited_but_capped_at_the_max_delay() {
        let policy = RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(300),
        };
        let mut delays = Vec::new();
        let started = Instant::now();
        let result: Result<(), _> = retry(
            &policy,
            |attempt| async move { Err(attempt) },
            |attempt: &u32| match attempt {
                1 => Verdict::RetryAfter(Duration::from_millis(150)),
                _ => Verdict::RetryAfter(Duration::from_secs(3600)),
            },
            |r| delays.push(r.delay),
        )
        .await;
        assert_eq!(result.unwrap_err().attempts, 3);
        assert_eq!(
            delays,
            [Duration::from_millis(150), Duration::from_millis(300)]
        );
        assert!(started.elapsed() >= Duration::from_millis(450));
    }

    #[test]
    fn the_log_line_names_the_attempt_the_error_and_the_wait() {
        let retrying = Retrying {
            attempt: 2,
            attempts: 6,
            error: &(),
            delay: Duration::from_millis(1300),
        };
        assert_eq!(
            retrying.describe("HTTP 503"),
            "attempt 2 of 6 failed: HTTP 503; retrying in 1.3 s"
        );
    }
}
