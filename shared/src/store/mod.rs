//! Persistence: every read and write of Tasker's tables.
//!
//! - [`templates`]: registering and reading templates.
//! - [`tasks`]: creating tasks (with their steps and edges) and reading them.
//! - [`transitions`]: **the one door for state changes.** Every change of a step's or a
//!   task's status is a named, batched statement there that guards on the current state
//!   (and, for results, on the dispatch token) and appends to the transition history.
//!
//! Queries are plain SQL checked by the end-to-end tests (not sqlx's compile-time macros,
//! which would need a live database to build).

pub mod analytics;
pub mod events;
pub mod inspect;
pub mod retention;
pub mod schedules;
pub mod tasks;
pub mod templates;
pub mod transitions;

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};

use crate::states::{CatchUp, Overlap, StepStatus, TaskStatus, TransitionReason};

macro_rules! text_enum_sql {
    ($name:ty) => {
        impl Type<Postgres> for $name {
            fn type_info() -> PgTypeInfo {
                <&str as Type<Postgres>>::type_info()
            }

            fn compatible(ty: &PgTypeInfo) -> bool {
                <&str as Type<Postgres>>::compatible(ty)
            }
        }

        impl<'r> Decode<'r, Postgres> for $name {
            fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
                let text = <&str as Decode<Postgres>>::decode(value)?;
                Ok(text.parse()?)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(ty: &PgTypeInfo) -> bool {
                <&str as sqlx::postgres::PgHasArrayType>::array_compatible(ty)
            }
        }

        impl Encode<'_, Postgres> for $name {
            fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
                <&str as Encode<Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}

text_enum_sql!(TaskStatus);
text_enum_sql!(StepStatus);
text_enum_sql!(TransitionReason);
text_enum_sql!(Overlap);
text_enum_sql!(CatchUp);
