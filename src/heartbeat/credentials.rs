//! The credential lifecycle: which token is sent next and which one is stored. A pure state
//! machine (no I/O, no clock of its own); the loop and `register` feed it events and persist
//! what it says is stored.
//!
//! The rule (ARCHITECTURE.md, "The rule for the stored token"): a token the server has
//! answered is never presented again (the one exception no client avoids: an answer that never
//! arrived); a token is on disk before it is presented; what is on disk is the token presented
//! next. So:
//! - The stored token changes only when the API issues a new one in a 2xx
//!   ([`Credentials::on_accepted`], [`store_issued`]), when the operator configures a
//!   different token ([`Credentials::start`], [`Credentials::reconfigure`]), or when a
//!   registration replaces the state. A rejection never replaces it.
//! - The newest token is the one sent, always: the loop persists it (in `state.json`, or in
//!   the token reserve when that save fails) before the next request goes out. No policy of
//!   the server makes an older one the better choice: under reuse detection presenting an
//!   answered token revokes the whole family.
//! - On 401/403 for the stored token: the stored token again after a short pause (a blip of
//!   the auth backend is the likeliest cause); only when it is refused again the configured
//!   token, once at once, then the two alternate on the slow schedule
//!   ([`Credentials::on_rejected`]). The configured token has been answered once the node
//!   rotated, so under reuse detection it is the last resort.
//! - A stored token that looks expired by the wall clock is still tried first: the clock can
//!   be wrong early at boot, and only the API knows.
//! - An issued token with white space at its edges is trimmed (RFC 6750's b64token holds none).

use crate::api::Issued;
use crate::config::Config;
use crate::secret::Secret;
use crate::state::State;
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// The pause before the stored token is presented again after a 401/403: an auth backend's
/// blip (a replica restarting, a cache miss) passes in seconds, and presenting the configured
/// token instead may count as reuse.
pub const STORED_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Which token goes out next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// The stored token (rotated, registered, or the configured one before any rotation).
    Stored,
    /// The configured token, after the stored one was rejected twice.
    Configured,
}

/// What to do after a 401/403.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRejection {
    /// Present the stored token again after [`STORED_RETRY_PAUSE`].
    RetryStoredSoon,
    /// Try again at once, with the configured token.
    RetryNow,
    /// Try again on the slow schedule; `switched` when the token to send changed.
    RetrySlowly { switched: bool },
}

/// How far the rejections since the last success went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejections {
    None,
    /// The stored token was refused once and is presented again after the pause.
    StoredOnce,
    /// The stored token was refused twice: the configured one was tried.
    FellBack,
}

/// Which token start-up (or a reload) chose, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// No state yet: the configured token.
    NoState,
    /// The state is another node's: the configured token replaces it.
    OtherNode,
    /// The configured token changed: it replaces the stored one.
    ConfiguredChanged,
    /// The stored (rotated) token.
    Stored,
    /// The stored token, carried over to a changed `api.url`.
    CarriedOver,
    /// A registered node's token (no configured one).
    Registered,
}

impl Choice {
    /// Whether the choice replaced a stored state (which is then kept beside it).
    pub fn replaced(self) -> bool {
        matches!(self, Choice::OtherNode | Choice::ConfiguredChanged)
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Choice::NoState => "no state yet: starting from the configured token",
            Choice::OtherNode => "state is for another node: starting from the configured token",
            Choice::ConfiguredChanged => "the configured token changed: starting from it",
            Choice::Stored => "using the stored (rotated) token",
            Choice::CarriedOver => {
                "api.url changed: using the stored (rotated) token with it (the configured token is the fallback)"
            }
            Choice::Registered => "using the registered node's token from the state file",
        })
    }
}

/// The token state of a running agent.
#[derive(Debug, Clone)]
pub struct Credentials {
    state: State,
    configured: Option<Secret>,
    sending: Sending,
    rejections: Rejections,
}

/// The one path from an API answer to a stored token: the new token (white space at its edges
/// trimmed), its type and expiry replace the stored ones.
pub fn store_issued(state: &mut State, issued: Issued, now: SystemTime) {
    let token = issued.token.expose();
    state.access_token = if token.trim() == token {
        issued.token
    } else {
        Secret::new(token.trim())
    };
    state.token_type = issued.token_type;
    state.token_expires_at = issued.expires_in.and_then(|d| now.checked_add(d));
}

/// The state `register` (or an import) writes for a node the API just accepted.
pub fn registered_state(node_id: Uuid, api_url: &str, issued: Issued, now: SystemTime) -> State {
    let mut state = State::new(node_id, api_url, issued.token.clone(), None);
    store_issued(&mut state, issued, now);
    state
}

impl Credentials {
    /// Start-up: the stored token when the state belongs to this node, API and configured
    /// token (even if it looks expired); otherwise the configured one. A registered node (no
    /// configured token) uses its state as it is. Returns the choice (for the log, and to keep
    /// a replaced state).
    pub fn start(cfg: &Config, stored: Option<State>) -> Result<(Self, Choice), String> {
        let file = cfg.file_hint();
        match (&cfg.api.node_id, &cfg.api.access_token) {
            (Some(node_id), Some(token)) => {
                let sha = token.sha256_hex();
                let choice = match &stored {
                    None => Choice::NoState,
                    Some(s) if s.node_id != *node_id => Choice::OtherNode,
                    Some(s) if s.configured_token_sha256.as_deref() != Some(sha.as_str()) => {
                        Choice::ConfiguredChanged
                    }
                    // Same node, same configured token, another URL: a typo fixed, an alias, a
                    // proxy — the same API. The stored token goes with it (the configured one
                    // stays the fallback after a 401); starting from the configured token
                    // would present one the API has answered.
                    Some(s) if s.api_url != cfg.api.url => Choice::CarriedOver,
                    Some(_) => Choice::Stored,
                };
                let state = match stored {
                    Some(mut s) if matches!(choice, Choice::Stored | Choice::CarriedOver) => {
                        s.api_url.clone_from(&cfg.api.url);
                        s
                    }
                    _ => State::new(*node_id, &cfg.api.url, token.clone(), Some(token)),
                };
                Ok((Self::new(state, Some(token.clone())), choice))
            }
            (None, Some(_)) => Err(format!(
                "api.access_token is set but api.node_id is not: set api.node_id in {file} (or EXALSIUS_NODE_ID)"
            )),
            (configured_id, None) => {
                let Some(s) = stored else {
                    return Err(format!(
                        "no access token: set api.node_id and api.access_token in {file} \
                         (or EXALSIUS_NODE_ID / EXALSIUS_ACCESS_TOKEN), or register this node with \
                         `exalsius-node-agent register`"
                    ));
                };
                if let Some(id) = configured_id
                    && *id != s.node_id
                {
                    return Err(format!(
                        "api.node_id = {id} in {} differs from the registered node {} in the state file; \
                         remove api.node_id or register again with --force",
                        cfg.origin_of("api.node_id"),
                        s.node_id
                    ));
                }
                if s.api_url != cfg.api.url {
                    return Err(format!(
                        "the node was registered with {} but api.url is {} in {}; make them match",
                        s.api_url,
                        cfg.api.url,
                        cfg.origin_of("api.url")
                    ));
                }
                Ok((Self::new(s, None), Choice::Registered))
            }
        }
    }

    /// Credentials around a state, sending the stored token.
    pub fn new(state: State, configured: Option<Secret>) -> Self {
        Self {
            state,
            configured,
            sending: Sending::Stored,
            rejections: Rejections::None,
        }
    }

    /// SIGHUP: the same rules as at start-up, applied to the running state. `Ok(None)` when
    /// the stored token stays (the alternation in progress goes on); `Ok(Some(choice))` when
    /// the operator's change replaced it.
    pub fn reconfigure(&mut self, cfg: &Config) -> Result<Option<Choice>, String> {
        let (next, choice) = Self::start(cfg, Some(self.state.clone()))?;
        if !choice.replaced() {
            self.configured = next.configured;
            self.state.api_url = next.state.api_url;
            if self.configured.is_none() {
                self.sending = Sending::Stored;
            }
            return Ok(None);
        }
        *self = next;
        Ok(Some(choice))
    }

    /// The token to send next.
    pub fn token(&self) -> &Secret {
        match (self.sending, &self.configured) {
            (Sending::Configured, Some(b)) => b,
            _ => &self.state.access_token,
        }
    }

    /// Which token goes out next.
    pub fn sending(&self) -> Sending {
        self.sending
    }

    /// The state to persist (its token is the stored one, whichever is being sent).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// For the loop's bookkeeping (attempt times, failures, description): the token fields
    /// change only through the event methods.
    pub fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    /// The configured token, if any.
    pub fn configured(&self) -> Option<&Secret> {
        self.configured.as_ref()
    }

    /// A 2xx: a new token is stored and sent from now on (once the loop has persisted it);
    /// without one, the token that was accepted keeps going out. Returns true when the stored
    /// token changed.
    pub fn on_accepted(&mut self, issued: Option<Issued>, now: SystemTime) -> bool {
        self.rejections = Rejections::None;
        match issued {
            Some(issued) => {
                store_issued(&mut self.state, issued, now);
                self.sending = Sending::Stored;
                true
            }
            None => false,
        }
    }

    /// A 401/403 for the token just sent. The stored token stays as it is.
    pub fn on_rejected(&mut self) -> AfterRejection {
        let alternative = self
            .configured
            .as_ref()
            .is_some_and(|b| *b != self.state.access_token);
        match (self.sending, self.rejections) {
            (Sending::Stored, Rejections::None) => {
                self.rejections = Rejections::StoredOnce;
                AfterRejection::RetryStoredSoon
            }
            (Sending::Stored, Rejections::StoredOnce) if alternative => {
                self.rejections = Rejections::FellBack;
                self.sending = Sending::Configured;
                AfterRejection::RetryNow
            }
            (Sending::Stored, _) if alternative => {
                self.sending = Sending::Configured;
                AfterRejection::RetrySlowly { switched: true }
            }
            (Sending::Stored, _) => AfterRejection::RetrySlowly { switched: false },
            (Sending::Configured, _) => {
                self.sending = Sending::Stored;
                AfterRejection::RetrySlowly { switched: true }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use std::path::Path;
    use std::time::Duration;

    const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn cfg(text: &str) -> Config {
        Config::from_toml(
            text,
            Path::new("/etc/x.toml"),
            &Overrides::default(),
            &|_| None,
        )
        .unwrap()
    }

    fn boot_cfg(token: &str) -> Config {
        cfg(&format!(
            "[api]\nurl = \"https://a.example\"\nnode_id = \"{ID}\"\naccess_token = \"{token}\"\n"
        ))
    }

    fn issued(t: &str) -> Issued {
        Issued {
            token: Secret::new(t),
            expires_in: Some(Duration::from_secs(3600)),
            token_type: Some("Bearer".into()),
        }
    }

    /// One event of the table.
    #[derive(Debug, Clone)]
    enum Ev {
        /// 2xx with a new token, or without one (`None`).
        Ok(Option<&'static str>),
        /// 401/403; the expected reaction.
        Reject(AfterRejection),
        /// SIGHUP with this configured token.
        Reload(&'static str),
        /// Restart of the process: start-up from the stored state and this configured token.
        Restart(&'static str),
    }
    use AfterRejection::{RetryNow, RetrySlowly, RetryStoredSoon};
    use Ev::*;

    /// Runs `events` from a fresh start with `boot`, checking after each event the token sent
    /// next and the token stored.
    fn table(boot: &str, start: Option<&str>, rows: &[(Ev, &str, &str)]) {
        let now = SystemTime::now();
        let stored = start.map(|t| {
            let mut s = State::new(
                Uuid::parse_str(ID).unwrap(),
                "https://a.example",
                Secret::new(t),
                Some(&Secret::new(boot)),
            );
            // Looks expired by the wall clock: still tried first.
            s.token_expires_at = Some(now - Duration::from_secs(3600));
            s
        });
        let (mut c, _) = Credentials::start(&boot_cfg(boot), stored).unwrap();
        for (i, (ev, sent, kept)) in rows.iter().enumerate() {
            match ev.clone() {
                Ok(t) => {
                    c.on_accepted(t.map(issued), now);
                }
                Reject(expected) => assert_eq!(c.on_rejected(), expected, "row {i}: {ev:?}"),
                Reload(t) => {
                    c.reconfigure(&boot_cfg(t)).unwrap();
                }
                Restart(t) => {
                    c = Credentials::start(&boot_cfg(t), Some(c.state().clone()))
                        .unwrap()
                        .0;
                }
            }
            assert_eq!(c.token().expose(), *sent, "row {i}: sent after {ev:?}");
            assert_eq!(
                c.state().access_token.expose(),
                *kept,
                "row {i}: stored after {ev:?}"
            );
        }
    }

    #[test]
    fn normal_rotation() {
        table(
            "boot",
            None,
            &[
                (Ok(Some("r1")), "r1", "r1"),
                (Ok(Some("r2")), "r2", "r2"),
                (Ok(None), "r2", "r2"),
                (Restart("boot"), "r2", "r2"),
            ],
        );
    }

    #[test]
    fn the_newest_token_goes_out_and_an_answered_one_never_again() {
        table(
            "boot",
            None,
            &[
                (Ok(Some("r1")), "r1", "r1"),
                // Whether or not state.json could be saved (the loop puts r2 in the reserve
                // then), r2 is what goes out: r1 has been answered.
                (Ok(Some("r2")), "r2", "r2"),
                (Ok(Some("r3")), "r3", "r3"),
                // A 401 meanwhile: r3 again after a pause, then the configured token, never r1
                // or r2.
                (Reject(RetryStoredSoon), "r3", "r3"),
                (Reject(RetryNow), "boot", "r3"),
                (Reject(RetrySlowly { switched: true }), "r3", "r3"),
                (Ok(Some("r4")), "r4", "r4"),
            ],
        );
    }

    #[test]
    fn one_spurious_401_is_answered_with_the_stored_token_again() {
        // Under reuse detection the configured token (answered when r1 was issued) would
        // revoke the family: a blip that rejects r1 once is retried with r1.
        table(
            "boot",
            Some("r1"),
            &[
                (Reject(RetryStoredSoon), "r1", "r1"),
                (Ok(Some("r2")), "r2", "r2"),
                // After a success the pause comes first again.
                (Reject(RetryStoredSoon), "r2", "r2"),
            ],
        );
    }

    #[test]
    fn long_rejection_alternates_on_the_slow_schedule() {
        table(
            "boot",
            Some("r1"),
            &[
                (Reject(RetryStoredSoon), "r1", "r1"),
                (Reject(RetryNow), "boot", "r1"),
                (Reject(RetrySlowly { switched: true }), "r1", "r1"),
                (Reject(RetrySlowly { switched: true }), "boot", "r1"),
                (Reject(RetrySlowly { switched: true }), "r1", "r1"),
                // A restart during the alternation starts from the stored token again.
                (Restart("boot"), "r1", "r1"),
                (Reject(RetryStoredSoon), "r1", "r1"),
                (Reject(RetryNow), "boot", "r1"),
                // The configured token is accepted: what it is issued is stored.
                (Ok(Some("r2")), "r2", "r2"),
                // After a success the pause and the immediate fallback come again.
                (Reject(RetryStoredSoon), "r2", "r2"),
                (Reject(RetryNow), "boot", "r2"),
            ],
        );
    }

    #[test]
    fn configured_accepted_without_a_new_token_keeps_the_stored_one() {
        table(
            "boot",
            Some("r1"),
            &[
                (Reject(RetryStoredSoon), "r1", "r1"),
                (Reject(RetryNow), "boot", "r1"),
                (Ok(None), "boot", "r1"),
                (Ok(Some("r2")), "r2", "r2"),
            ],
        );
    }

    #[test]
    fn without_an_alternative_the_same_token_is_retried_slowly() {
        table(
            "boot",
            None,
            &[
                (Reject(RetryStoredSoon), "boot", "boot"),
                (Reject(RetrySlowly { switched: false }), "boot", "boot"),
                (Reject(RetrySlowly { switched: false }), "boot", "boot"),
            ],
        );
    }

    #[test]
    fn the_operator_configuring_a_new_token_replaces_the_stored_one() {
        table(
            "boot",
            Some("r1"),
            &[
                (Reload("boot"), "r1", "r1"),
                (Reload("boot-2"), "boot-2", "boot-2"),
                (Ok(Some("r2")), "r2", "r2"),
                (Restart("boot-3"), "boot-3", "boot-3"),
            ],
        );
        // A reload with the same token in the middle of an alternation changes nothing.
        table(
            "boot",
            Some("r1"),
            &[
                (Reject(RetryStoredSoon), "r1", "r1"),
                (Reject(RetryNow), "boot", "r1"),
                (Reload("boot"), "boot", "r1"),
            ],
        );
    }

    #[test]
    fn a_registered_node_has_no_fallback() {
        let c = cfg("[api]\nurl = \"https://a.example\"\n");
        let now = SystemTime::now();
        let e = Credentials::start(&c, None).unwrap_err();
        assert!(e.contains("register"), "{e}");
        let id = Uuid::parse_str(ID).unwrap();
        let mut creds = Credentials::new(
            registered_state(id, "https://a.example", issued("reg"), now),
            None,
        );
        let (mut got, _) = Credentials::start(&c, Some(creds.state().clone())).unwrap();
        assert!(got.configured().is_none());
        assert_eq!(got.on_rejected(), RetryStoredSoon);
        assert_eq!(
            got.on_rejected(),
            RetrySlowly { switched: false },
            "no configured to fall back to"
        );
        assert_eq!(got.token().expose(), "reg");
        assert!(creds.on_accepted(Some(issued("reg-2")), now));
        assert_eq!(creds.state().access_token.expose(), "reg-2");
        let c_other = cfg(&format!(
            "[api]\nurl = \"https://a.example\"\nnode_id = \"{}\"\n",
            Uuid::nil()
        ));
        let e = Credentials::start(&c_other, Some(creds.state().clone())).unwrap_err();
        assert!(e.contains("differs"), "{e}");
    }

    #[test]
    fn start_up_choice() {
        let c = boot_cfg("boot");
        let now = SystemTime::now();
        let (fresh, _) = Credentials::start(&c, None).unwrap();
        assert_eq!(fresh.token().expose(), "boot");
        let mut rotated = fresh.state().clone();
        rotated.access_token = Secret::new("rot-1");
        // Expired by the wall clock: still the stored token.
        rotated.token_expires_at = Some(now - Duration::from_secs(1));
        let (got, why) = Credentials::start(&c, Some(rotated.clone())).unwrap();
        assert_eq!(got.token().expose(), "rot-1");
        assert_eq!(why, Choice::Stored);
        // Other node → configured token.
        let mut other = rotated.clone();
        other.node_id = Uuid::nil();
        assert_eq!(
            Credentials::start(&c, Some(other))
                .unwrap()
                .0
                .token()
                .expose(),
            "boot"
        );
        // Another URL, same node and configured token (a typo fixed): the stored token, now
        // tied to the configured URL, with the configured token as the fallback.
        let mut other = rotated;
        other.api_url = "https://b.example".into();
        let (got, why) = Credentials::start(&c, Some(other)).unwrap();
        assert_eq!(got.token().expose(), "rot-1");
        assert_eq!(why, Choice::CarriedOver);
        assert_eq!(got.state().api_url, c.api.url);
        assert_eq!(got.configured().map(Secret::expose), Some("boot"));
    }

    #[test]
    fn issued_expiry_and_type_are_stored() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut s = State::new(Uuid::nil(), "u", Secret::new("a"), None);
        store_issued(&mut s, issued("b"), now);
        assert_eq!(s.access_token.expose(), "b");
        assert_eq!(s.token_type.as_deref(), Some("Bearer"));
        assert_eq!(s.token_expires_at, Some(now + Duration::from_secs(3600)));
        store_issued(
            &mut s,
            Issued {
                token: Secret::new("c"),
                expires_in: None,
                token_type: None,
            },
            now,
        );
        assert_eq!(s.token_expires_at, None);
    }

    #[test]
    fn an_issued_token_with_white_space_at_its_edges_is_trimmed() {
        let mut c = Credentials::new(State::new(Uuid::nil(), "u", Secret::new("a"), None), None);
        assert!(c.on_accepted(Some(issued(" \tb-1\r\n")), SystemTime::now()));
        assert_eq!(c.token().expose(), "b-1");
        assert_eq!(c.state().access_token.expose(), "b-1");
    }
}
