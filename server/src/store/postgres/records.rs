use sqlx::PgPool;

use crate::store::{Effect, Record, Result, StoreError};

pub(super) async fn record(_pool: &PgPool, _batch: &[Record]) -> Result<Vec<Effect>> {
    Err(StoreError::Database("recording session batches on PostgreSQL is not built yet".into()))
}
