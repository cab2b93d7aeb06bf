//! Rooms: capabilities whose commands, outcomes, rejections and kinds of state row are
//! declared in a module of their own ([`Room`]) and registered with one line (`rooms!` below).
//!
//! The journal, the idempotency keys, every backend's loaders and the state's dispatch then
//! carry a room's commands with no code of their own for it: a room's command travels as
//! [`Command::Room`](crate::Command::Room), its outcome as
//! [`Outcome::Room`](crate::Outcome::Room), its refusal as [`Rejection::Room`], each
//! encoded under the tags the room claims (which this module's tests hold apart from every
//! other room's and from the core's).

use std::fmt::Debug;

use farthing_kernel::DecodeError;
use farthing_ledger::Timestamp;

use crate::codec::{Reader, Writer};
use crate::kinds::KindInfo;
use crate::{Needs, Rejection, State};

/// A capability's commands.
///
/// Everything here is pure: `execute` changes the state as
/// [`State::apply`](crate::State::apply) does, from the time and ids the command carries.
pub trait Room: 'static {
    type Command: Clone + PartialEq + Eq + Debug;
    type Outcome: Clone + PartialEq + Eq + Debug;
    type Rejection: Copy + PartialEq + Eq + Debug;
    /// What the needs of a batch's earlier commands leave for its later ones (an expiry after
    /// another reads the holds that one may release before its own).
    type Batch: Default;

    /// The journal tags of its commands, outcomes and rejections: stable, never reused, and
    /// claimed by no other room (nor by the core's own).
    const COMMAND_TAGS: &'static [u8];
    const OUTCOME_TAGS: &'static [u8];
    const REJECTION_TAGS: &'static [u8];

    /// Writes a command: its tag, then its fields.
    fn encode(command: &Self::Command, out: &mut Writer);
    /// Reads the command of `tag` (one of [`Room::COMMAND_TAGS`]).
    fn decode(tag: u8, input: &mut Reader) -> Result<Self::Command, DecodeError>;
    /// Writes an outcome: its tag, then its fields.
    fn encode_outcome(outcome: &Self::Outcome, out: &mut Writer);
    /// Reads the outcome of `tag` (one of [`Room::OUTCOME_TAGS`]).
    fn decode_outcome(tag: u8, input: &mut Reader) -> Result<Self::Outcome, DecodeError>;
    fn rejection_tag(rejection: Self::Rejection) -> u8;
    fn rejection_of_tag(tag: u8) -> Option<Self::Rejection>;

    /// Adds what applying `command` reads to `needs` (see [`State::needs`]).
    fn needs(state: &State, command: &Self::Command, batch: &mut Self::Batch, needs: &mut Needs);
    /// Applies `command`.
    fn execute(
        state: &mut State,
        now: Timestamp,
        command: &Self::Command,
    ) -> Result<Self::Outcome, Rejection>;
    /// The largest payment, top-up, refund or transfer id `command` makes (0 for none): a
    /// cache's bound on the ids of its history.
    fn ids_max(command: &Self::Command) -> u128;
    /// Whether `command` settles pending transfers: it reads their accounts' pending totals,
    /// which agree with a transfer's record only while the accounts are locked (a shared
    /// store loads them before working anything out).
    fn settles_pending(command: &Self::Command) -> bool;
    /// Whether an idempotency key keeps this outcome (an answer to give again on retry).
    fn keeps_outcome(outcome: &Self::Outcome) -> bool;
    /// Whether an idempotency key keeps this refusal: a decline the caller must see again,
    /// not a request wrong from the start.
    fn keeps_rejection(rejection: Self::Rejection) -> bool;
    /// How `command` would be refused if it were applied now, from the checks it makes
    /// before it moves money (see [`State::refusal`]); `None` when it might succeed.
    fn refused(state: &State, command: &Self::Command) -> Option<Rejection>;
    /// How the refusal is told to callers.
    fn explain(rejection: Self::Rejection) -> Explained;
}

/// A refusal as callers see it: a stable code, a title and a sentence, and what kind of
/// refusal it is (which the API turns into a status).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Explained {
    pub kind: RefusalKind,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: &'static str,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RefusalKind {
    /// The object is not there (or not the caller's to see).
    NotFound,
    /// The object is not in a state that allows it (409).
    Conflict,
    /// The request asks for something the object cannot give (422).
    Unprocessable,
    /// Money is short (402).
    PaymentRequired,
}

/// Registers each room: its module, its name in [`RoomCommand`] and its siblings, and the
/// kinds of state row it keeps. One line per room.
macro_rules! rooms {
    ($($name:ident => $module:ident :: $room:ident [$($kind:ident),* $(,)?]),* $(,)?) => {
        $(pub mod $module;)*

        /// Every kind of state row, in the order exports list them: each room's, as its line
        /// in `rooms!` names them.
        pub const KINDS: &[KindInfo] = &[$($(KindInfo::of::<$module::$kind>(),)*)*];

        /// A room's command.
        #[derive(Clone, PartialEq, Eq, Debug)]
        pub enum RoomCommand {
            $($name(<$module::$room as Room>::Command),)*
        }

        /// A room's outcome.
        #[derive(Clone, PartialEq, Eq, Debug)]
        pub enum RoomOutcome {
            $($name(<$module::$room as Room>::Outcome),)*
        }

        /// A room's rejection.
        #[derive(Clone, Copy, PartialEq, Eq, Debug)]
        pub enum RoomRejection {
            $($name(<$module::$room as Room>::Rejection),)*
        }

        /// What the needs of a batch's earlier commands leave for later ones, per room.
        #[derive(Default)]
        pub(crate) struct RoomBatches {
            $($module: <$module::$room as Room>::Batch,)*
        }

        /// Every tag rooms claim, by room: commands, outcomes, rejections.
        #[cfg(test)]
        pub(crate) const TAGS: &[(&str, &[u8], &[u8], &[u8])] = &[$((
            stringify!($name),
            <$module::$room as Room>::COMMAND_TAGS,
            <$module::$room as Room>::OUTCOME_TAGS,
            <$module::$room as Room>::REJECTION_TAGS,
        ),)*];

        impl RoomCommand {
            pub(crate) fn encode(&self, out: &mut Writer) {
                match self {
                    $(RoomCommand::$name(command) => <$module::$room as Room>::encode(command, out),)*
                }
            }

            /// The command of `tag`, if a room claims it.
            pub(crate) fn decode(tag: u8, input: &mut Reader) -> Option<Result<RoomCommand, DecodeError>> {
                $(if <$module::$room as Room>::COMMAND_TAGS.contains(&tag) {
                    return Some(<$module::$room as Room>::decode(tag, input).map(RoomCommand::$name));
                })*
                None
            }

            pub(crate) fn needs(&self, state: &State, batch: &mut RoomBatches, needs: &mut Needs) {
                match self {
                    $(RoomCommand::$name(command) => {
                        <$module::$room as Room>::needs(state, command, &mut batch.$module, needs)
                    })*
                }
            }

            pub(crate) fn execute(&self, state: &mut State, now: Timestamp) -> Result<RoomOutcome, Rejection> {
                match self {
                    $(RoomCommand::$name(command) => {
                        <$module::$room as Room>::execute(state, now, command).map(RoomOutcome::$name)
                    })*
                }
            }

            pub(crate) fn ids_max(&self) -> u128 {
                match self {
                    $(RoomCommand::$name(command) => <$module::$room as Room>::ids_max(command),)*
                }
            }

            /// See [`Room::refused`].
            pub(crate) fn refused(&self, state: &State) -> Option<Rejection> {
                match self {
                    $(RoomCommand::$name(command) => <$module::$room as Room>::refused(state, command),)*
                }
            }

            /// See [`Room::settles_pending`].
            pub fn settles_pending(&self) -> bool {
                match self {
                    $(RoomCommand::$name(command) => <$module::$room as Room>::settles_pending(command),)*
                }
            }
        }

        impl RoomOutcome {
            pub(crate) fn encode(&self, out: &mut Writer) {
                match self {
                    $(RoomOutcome::$name(outcome) => <$module::$room as Room>::encode_outcome(outcome, out),)*
                }
            }

            /// The outcome of `tag`, if a room claims it.
            pub(crate) fn decode(tag: u8, input: &mut Reader) -> Option<Result<RoomOutcome, DecodeError>> {
                $(if <$module::$room as Room>::OUTCOME_TAGS.contains(&tag) {
                    return Some(<$module::$room as Room>::decode_outcome(tag, input).map(RoomOutcome::$name));
                })*
                None
            }

            pub(crate) fn is_kept_for_idempotency(&self) -> bool {
                match self {
                    $(RoomOutcome::$name(outcome) => <$module::$room as Room>::keeps_outcome(outcome),)*
                }
            }
        }

        impl RoomRejection {
            pub(crate) fn tag(self) -> u8 {
                match self {
                    $(RoomRejection::$name(rejection) => <$module::$room as Room>::rejection_tag(rejection),)*
                }
            }

            /// Every rejection of every room, by tag.
            pub fn every() -> Vec<RoomRejection> {
                let mut every = Vec::new();
                $(every.extend(
                    <$module::$room as Room>::REJECTION_TAGS
                        .iter()
                        .filter_map(|tag| <$module::$room as Room>::rejection_of_tag(*tag))
                        .map(RoomRejection::$name),
                );)*
                every
            }

            /// The rejection of `tag`, if a room claims it.
            pub(crate) fn of_tag(tag: u8) -> Option<RoomRejection> {
                $(if let Some(rejection) = <$module::$room as Room>::rejection_of_tag(tag) {
                    return Some(RoomRejection::$name(rejection));
                })*
                None
            }

            pub(crate) fn is_kept_for_idempotency(self) -> bool {
                match self {
                    $(RoomRejection::$name(rejection) => <$module::$room as Room>::keeps_rejection(rejection),)*
                }
            }

            /// How the refusal is told to callers.
            pub fn explain(self) -> Explained {
                match self {
                    $(RoomRejection::$name(rejection) => <$module::$room as Room>::explain(rejection),)*
                }
            }
        }

        $(
            impl From<<$module::$room as Room>::Command> for crate::Command {
                fn from(command: <$module::$room as Room>::Command) -> crate::Command {
                    crate::Command::Room(RoomCommand::$name(command))
                }
            }

            impl From<<$module::$room as Room>::Outcome> for crate::Outcome {
                fn from(outcome: <$module::$room as Room>::Outcome) -> crate::Outcome {
                    crate::Outcome::Room(RoomOutcome::$name(outcome))
                }
            }

            impl From<<$module::$room as Room>::Rejection> for Rejection {
                fn from(rejection: <$module::$room as Room>::Rejection) -> Rejection {
                    Rejection::Room(RoomRejection::$name(rejection))
                }
            }
        )*
    };
}

rooms! {
    Holds => holds::Holds [HoldKind],
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::TAGS;

    /// Tags the core's own commands, outcomes and rejections use (`codec.rs`).
    const CORE_COMMAND_TAGS: &[u8] = &[1, 2, 3, 4, 5, 6, 7, 8, 9];
    const CORE_OUTCOME_TAGS: &[u8] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    const CORE_REJECTION_TAGS: &[u8] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn apart(what: &str, core: &[u8], rooms: impl Iterator<Item = (&'static str, &'static [u8])>) {
        let mut seen: HashSet<u8> = core.iter().copied().collect();
        for (room, tags) in rooms {
            assert!(
                !tags.is_empty() || what == "rejection",
                "{room} claims no {what} tag"
            );
            for tag in tags {
                assert!(
                    seen.insert(*tag),
                    "{room} claims {what} tag {tag}, already taken"
                );
            }
        }
    }

    #[test]
    fn every_room_claims_tags_no_other_room_and_not_the_core_uses() {
        apart(
            "command",
            CORE_COMMAND_TAGS,
            TAGS.iter().map(|t| (t.0, t.1)),
        );
        apart(
            "outcome",
            CORE_OUTCOME_TAGS,
            TAGS.iter().map(|t| (t.0, t.2)),
        );
        apart(
            "rejection",
            CORE_REJECTION_TAGS,
            TAGS.iter().map(|t| (t.0, t.3)),
        );
    }

    #[test]
    fn a_room_decodes_exactly_the_rejection_tags_it_claims() {
        for (room, _, _, rejections) in TAGS {
            for tag in 0..=u8::MAX {
                let decoded = super::RoomRejection::of_tag(tag);
                if rejections.contains(&tag) {
                    let rejection = decoded.unwrap_or_else(|| panic!("{room} reads its tag {tag}"));
                    assert_eq!(
                        rejection.tag(),
                        tag,
                        "{room}'s rejection {tag} writes its tag"
                    );
                }
            }
        }
    }
}
