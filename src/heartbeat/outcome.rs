//! From an attempt's outcome to the next wait: the token and state updated and persisted, the
//! metrics written, the log line, the systemd status. The decisions themselves are pure, in
//! `schedule` and `credentials`.

use super::*;

impl Agent {
    /// Updates token and state from an outcome, persists, logs, and decides the wait.
    pub(super) fn handle(&mut self, outcome: Result<Success, Failure>, had_body: bool) -> Next {
        let now = SystemTime::now();
        self.creds.state_mut().last_attempt_at = Some(now);
        let outcome = outcome.and_then(|s| self.check_node(s));
        let (label, status) = match &outcome {
            Ok(s) => ("ok", Some(s.status)),
            Err(f) => (outcome_label(f.kind), f.status),
        };
        let next = match outcome {
            Ok(success) => self.on_success(success, now),
            Err(failure) => self.on_failure(failure, now, had_body),
        };
        // Before the next request: the token it presents is on disk first.
        self.persisted = self.sink.save(self.creds.state());
        match &self.persisted {
            Saved::StateFile | Saved::NotKept => {}
            Saved::Reserve { seq, why } => warn!(
                "cannot persist state: {why}; the newest token is in the token reserve (entry {seq}) and is the one sent; saving state.json is retried every heartbeat"
            ),
            Saved::Nowhere { why } => error!(
                "cannot persist state anywhere, not even in the token reserve: {why}; the newest token is sent (never one the API has answered) but a crash now loses it: free the state disk; saving is retried every heartbeat"
            ),
        }
        if let Some(m) = &mut self.metrics {
            m.attempt(label, status, self.sent_at.elapsed(), self.creds.state());
            if let Some(level) = self.persisted.level() {
                m.token_persisted(level);
            }
            m.write();
        }
        self.report_status(&next, now);
        crate::footprint::heartbeat_done();
        next
    }

    /// A 2xx for another node is not a success: a misrouting proxy must not rotate our token.
    pub(super) fn check_node(&self, s: Success) -> Result<Success, Failure> {
        let ours = self.creds.state().node_id;
        match Uuid::parse_str(s.body.node_id.trim()) {
            Ok(id) if id == ours => Ok(s),
            _ => Err(Failure {
                kind: FailureKind::Retryable,
                status: Some(s.status),
                message: format!(
                    "HTTP {} answered for node {:?}, not for this node {ours}; ignored",
                    s.status, s.body.node_id
                ),
                retry_after: None,
            }),
        }
    }

    pub(super) fn on_success(&mut self, success: Success, now: SystemTime) -> Next {
        for note in &success.body.notes {
            warn!("heartbeat answer: {note}");
        }
        let lifetime = success.body.issued.as_ref().and_then(|i| i.expires_in);
        if self.creds.sending() == Sending::Configured {
            info!("the configured access token was accepted");
        }
        // The state already names the running API URL (`Credentials::start`/`reconfigure`).
        self.creds.on_accepted(success.body.issued, now);
        self.bodyless_next = false;
        let state = self.creds.state_mut();
        state.last_success_at = Some(now);
        state.consecutive_failures = 0;
        state.last_error = None;
        let wait = self.next_wait(Verdict::Ok, now);
        if let Some(since) = self.failing_since.take() {
            let down = now.duration_since(since).unwrap_or_default();
            info!("API reachable again after {}", secs(down));
        }
        if self.mode != Mode::DryRun {
            let expiry = lifetime.map_or_else(|| "unknown".to_string(), secs);
            info!(
                status = success.status,
                latency_ms = success.latency.as_millis() as u64,
                token_expires_in = %expiry,
                next_in = %secs(wait),
                "heartbeat ok"
            );
        }
        Next {
            wait,
            failure: None,
            immediate: false,
        }
    }

    /// The schedule's wait for `v`, kept short of half the stored token's remaining lifetime.
    pub(super) fn next_wait(&mut self, v: Verdict, now: SystemTime) -> Duration {
        self.schedule
            .next(v, self.creds.state().token_expires_at, now)
    }

    // Long: one arm per kind of failure, each with its own log line naming what to do.
    pub(super) fn on_failure(&mut self, failure: Failure, now: SystemTime, had_body: bool) -> Next {
        let state = self.creds.state_mut();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        state.last_error = Some(failure.message.clone());
        let n = state.consecutive_failures;
        self.failing_since.get_or_insert(now);
        let mut immediate = false;
        let wait = match failure.kind {
            FailureKind::Retryable => {
                let wait = self.next_wait(
                    Verdict::Retryable {
                        retry_after: failure.retry_after,
                    },
                    now,
                );
                warn!(
                    attempt = n,
                    "heartbeat failed: {failure}; retrying in {}",
                    secs(wait)
                );
                wait
            }
            FailureKind::Unauthorized => {
                let (wait, retry_now) = self.on_rejected_token(&failure, n, now);
                // The one immediate try with the configured token: `--once` makes it too.
                immediate = retry_now;
                wait
            }
            FailureKind::NotFound => {
                let wait = self.next_wait(Verdict::Slow, now);
                error!(
                    attempt = n,
                    "heartbeat failed: {failure}; node {} is not in the pool at {}: check {}; retrying in {}",
                    self.creds.state().node_id,
                    self.cfg.api.url,
                    if self.cfg.api.node_id.is_some() {
                        format!("api.node_id in {}", self.cfg.origin_of("api.node_id"))
                    } else {
                        "the registration (the node id comes from the state file written by `register`)".to_string()
                    },
                    secs(wait)
                );
                wait
            }
            FailureKind::Rejected | FailureKind::Conflict if had_body => {
                // The API does not accept what we report; keep the node alive and the token
                // rotating with a pure heartbeat now, and offer the body again next time.
                warn!(
                    attempt = n,
                    "heartbeat body rejected: {failure}; sending a heartbeat without specs now"
                );
                self.bodyless_next = true;
                immediate = true;
                self.next_wait(Verdict::Now, now)
            }
            FailureKind::Rejected | FailureKind::Conflict => {
                self.bodyless_next = false;
                let wait = self.next_wait(Verdict::Rejected, now);
                warn!(
                    attempt = n,
                    "heartbeat rejected: {failure}; next try in {}",
                    secs(wait)
                );
                wait
            }
        };
        Next {
            wait,
            failure: Some(failure),
            immediate,
        }
    }

    /// 401/403: the credential rules decide the token; the log says what the operator can do.
    /// Returns the wait and whether it is the immediate try with the configured token.
    pub(super) fn on_rejected_token(
        &mut self,
        failure: &Failure,
        n: u32,
        now: SystemTime,
    ) -> (Duration, bool) {
        let rejected = self.creds.sending();
        match self.creds.on_rejected() {
            AfterRejection::RetryStoredSoon => {
                warn!(
                    "heartbeat failed: {failure}; the stored token was rejected, presenting it again in {} (a blip of the API's authentication is the likeliest cause)",
                    secs(STORED_RETRY_PAUSE)
                );
                (STORED_RETRY_PAUSE, true)
            }
            AfterRejection::RetryNow => {
                warn!(
                    "heartbeat failed: {failure}; the stored token was rejected twice, retrying once with the configured token (the stored token is kept)"
                );
                (self.next_wait(Verdict::Now, now), true)
            }
            AfterRejection::RetrySlowly { switched } => {
                let wait = self.next_wait(Verdict::Slow, now);
                let what_to_do = if self.creds.configured().is_some() {
                    format!("if this persists, {}", self.cfg.new_token_advice())
                } else {
                    "if this persists, this node's registration is no longer accepted: re-register it with `exalsius-node-agent register --force …` (stop the service first)".to_string()
                };
                let which = match rejected {
                    Sending::Stored => "stored",
                    Sending::Configured => "configured",
                };
                let next = if switched {
                    match self.creds.sending() {
                        Sending::Stored => "; next try with the stored token",
                        Sending::Configured => "; next try with the configured token",
                    }
                } else {
                    ""
                };
                error!(
                    attempt = n,
                    "heartbeat failed: {failure}; the {which} access token was rejected: {what_to_do}; retrying in {}{next}",
                    secs(wait)
                );
                (wait, false)
            }
        }
    }

    pub(super) fn report_status(&self, next: &Next, now: SystemTime) {
        let line = match (&next.failure, self.failing_since) {
            (None, _) => {
                let token = self
                    .creds
                    .state()
                    .token_expires_at
                    .and_then(|t| t.duration_since(now).ok())
                    .map_or_else(String::new, |d| {
                        format!(
                            ", token valid {}",
                            humantime::format_duration(Duration::from_secs(d.as_secs()))
                        )
                    });
                format!("last heartbeat {}: ok{token}", rfc3339(now))
            }
            (Some(f), since) => format!(
                "API failing since {}: {}; retrying in {}",
                since.map_or_else(|| rfc3339(now), rfc3339),
                f.message,
                secs(next.wait)
            ),
        };
        let line = match &self.persisted {
            Saved::Reserve { .. } => {
                format!("state file cannot be saved (the token is in the reserve); {line}")
            }
            Saved::Nowhere { .. } => format!(
                "ALARM: the token cannot be saved anywhere (a crash loses the node); {line}"
            ),
            Saved::StateFile | Saved::NotKept => line,
        };
        systemd::status(&line);
    }
}

/// The `outcome` label of `exalsius_node_agent_heartbeats_total`.
fn outcome_label(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Retryable => "transient",
        FailureKind::Unauthorized => "unauthorized",
        FailureKind::NotFound => "not_found",
        FailureKind::Rejected | FailureKind::Conflict => "rejected",
    }
}
