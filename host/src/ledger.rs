//! What the verifier has committed, kept by the host so that no guest can print text the
//! target never produced: every token a drafter emits is checked against it.
//!
//! The verifier commits the first token, then per round the accepted drafts of the block
//! the host sent and one more token: the bonus or greedy correction it names, or — when a
//! sampled draft was rejected — a correction the drafter samples from the top-K the
//! verifier sent, which must therefore be one of those ids.

use std::collections::{HashMap, VecDeque};

use tandem_core::protocol::{Outcome, ServerMsg};

/// One committed position.
#[derive(Debug, Clone, PartialEq)]
enum Slot {
    /// Exactly this token.
    Token(u32),
    /// A correction the drafter samples: one of these ids.
    OneOf(Vec<u32>),
}

/// Why an emitted token was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    /// The verifier committed a different token at that position.
    #[error(
        "emitted token {got} at position {at} of the output, but the verifier committed {want}"
    )]
    Mismatch {
        /// Position in the generated text (0 = the first generated token).
        at: usize,
        /// What was emitted.
        got: u32,
        /// What the verifier committed (`one of [...]` for a sampled correction).
        want: String,
    },
    /// Nothing is committed at that position yet.
    #[error(
        "emitted token {got} at position {at} of the output, which the verifier has not committed"
    )]
    Uncommitted {
        /// Position in the generated text.
        at: usize,
        /// What was emitted.
        got: u32,
    },
    /// More tokens than the generation may produce.
    #[error("emitted more than the {max} tokens the generation may produce")]
    TooMany {
        /// The cap.
        max: usize,
    },
}

/// The committed tokens not yet emitted, and the blocks in flight.
#[derive(Debug, Default)]
pub struct Ledger {
    pending: VecDeque<Slot>,
    blocks: HashMap<u32, Vec<u32>>,
    emitted: usize,
    max_tokens: usize,
}

impl Ledger {
    /// A ledger for a generation of at most `max_tokens` tokens.
    pub fn new(max_tokens: usize) -> Self {
        Ledger {
            max_tokens,
            ..Ledger::default()
        }
    }

    /// The host sent a block for `round`.
    pub fn sent(&mut self, round: u32, drafts: &[u32]) {
        self.blocks.insert(round, drafts.to_vec());
    }

    /// A message from the verifier, before the guest sees it.
    pub fn observe(&mut self, msg: &ServerMsg) {
        match msg {
            ServerMsg::First(t) => self.pending.push_back(Slot::Token(*t)),
            ServerMsg::Result(r) => {
                let drafts = self.blocks.remove(&r.round).unwrap_or_default();
                let n = (r.accepted as usize).min(drafts.len());
                self.pending
                    .extend(drafts[..n].iter().map(|&t| Slot::Token(t)));
                self.pending.push_back(match &r.outcome {
                    Outcome::Token(t) => Slot::Token(*t),
                    Outcome::Residual(top) => Slot::OneOf(top.iter().map(|&(id, _)| id).collect()),
                });
            }
            _ => {}
        }
    }

    /// Checks tokens the guest emits, in order.
    pub fn emit(&mut self, tokens: &[u32]) -> Result<(), Refused> {
        for &t in tokens {
            let at = self.emitted;
            if at >= self.max_tokens {
                return Err(Refused::TooMany {
                    max: self.max_tokens,
                });
            }
            match self.pending.pop_front() {
                None => return Err(Refused::Uncommitted { at, got: t }),
                Some(Slot::Token(w)) if w != t => {
                    return Err(Refused::Mismatch {
                        at,
                        got: t,
                        want: w.to_string(),
                    });
                }
                Some(Slot::OneOf(ids)) if !ids.contains(&t) => {
                    return Err(Refused::Mismatch {
                        at,
                        got: t,
                        want: format!("one of {ids:?}"),
                    });
                }
                Some(_) => {}
            }
            self.emitted += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tandem_core::protocol::VerifyResult;

    use super::*;

    fn result(round: u32, accepted: u32, outcome: Outcome) -> ServerMsg {
        ServerMsg::Result(VerifyResult {
            round,
            accepted,
            outcome,
            verify_us: 0,
        })
    }

    #[test]
    fn only_what_the_verifier_committed_can_be_emitted() {
        let mut l = Ledger::new(8);
        l.observe(&ServerMsg::First(5));
        l.emit(&[5]).unwrap();
        l.sent(0, &[6, 7, 8]);
        l.observe(&result(0, 2, Outcome::Token(9)));
        assert_eq!(
            l.emit(&[6, 8]),
            Err(Refused::Mismatch {
                at: 2,
                got: 8,
                want: "7".into()
            })
        );

        let mut l = Ledger::new(8);
        l.observe(&ServerMsg::First(5));
        l.sent(0, &[6, 7, 8]);
        l.observe(&result(0, 2, Outcome::Token(9)));
        l.emit(&[5, 6, 7, 9]).unwrap();
        assert_eq!(l.emit(&[10]), Err(Refused::Uncommitted { at: 4, got: 10 }));
    }

    #[test]
    fn a_sampled_correction_must_come_from_the_top_k() {
        let mut l = Ledger::new(8);
        l.observe(&ServerMsg::First(1));
        l.sent(3, &[2]);
        l.observe(&result(3, 0, Outcome::Residual(vec![(4, 0.5), (7, 0.25)])));
        l.emit(&[1, 7]).unwrap();

        let mut l = Ledger::new(8);
        l.observe(&ServerMsg::First(1));
        l.sent(3, &[2]);
        l.observe(&result(3, 0, Outcome::Residual(vec![(4, 0.5), (7, 0.25)])));
        assert!(matches!(
            l.emit(&[1, 2]),
            Err(Refused::Mismatch { at: 1, .. })
        ));
    }

    #[test]
    fn emitting_fewer_is_fine_more_than_the_cap_is_not() {
        let mut l = Ledger::new(2);
        l.observe(&ServerMsg::First(1));
        l.sent(0, &[2, 3]);
        l.observe(&result(0, 2, Outcome::Token(4)));
        l.emit(&[1, 2]).unwrap();
        assert_eq!(l.emit(&[3]), Err(Refused::TooMany { max: 2 }));
    }
}
