//! Rows that could not be read at start-up, set aside so that the rest loads.
//!
//! A stored row that no longer decodes (a disk fault, a bug, a file edited by hand) must not keep
//! the control plane from starting, and must not be lost either: it is moved, in one
//! transaction, from its table to [`Table::SetAside`], with the reason and the time, and its
//! bytes kept as they were (hex). The control plane logs each one, counts them
//! (`ferry_store_rows_set_aside`), and lists them (`GET /v1/store/set-aside`, the registry's
//! `ListSetAside`, `ferryctl status`). Nothing reads them back on its own: an operator who fixes
//! one writes it again through the API.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, Table, Write};

/// One row set aside, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAsideRow {
    /// The table it was in.
    pub table: String,
    /// Its key there.
    pub key: String,
    /// Why it could not be read.
    pub reason: String,
    /// When it was set aside, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Its bytes, unchanged, in lowercase hex.
    pub hex: String,
}

impl SetAsideRow {
    /// How many bytes the row held.
    pub fn len(&self) -> usize {
        self.hex.len() / 2
    }

    /// Whether the row held nothing.
    pub fn is_empty(&self) -> bool {
        self.hex.is_empty()
    }

    /// When it was set aside.
    pub fn at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.at_ms)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

/// Moves the row `key` of `table`, holding `value`, to [`Table::SetAside`] because of `reason`,
/// in one transaction, and logs it (never its value, which may be a token's hash).
pub async fn set_aside(store: &dyn Store, table: Table, key: &str, value: &[u8], reason: &str) -> Result<(), StoreError> {
    let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let row =
        SetAsideRow { table: table.name().to_owned(), key: key.to_owned(), reason: reason.to_owned(), at_ms, hex: hex(value) };
    let stored = serde_json::to_vec(&row).map_err(|e| StoreError::new(format!("encoding a row set aside: {e}")))?;
    let aside_key = format!("{}/{key}@{at_ms}", table.name());
    store
        .apply(vec![
            Write { table: Table::SetAside, key: aside_key, value: Some(stored) },
            Write { table, key: key.to_owned(), value: None },
        ])
        .await?;
    tracing::error!(
        table = table.name(),
        key,
        reason,
        bytes = value.len(),
        "a stored row could not be read: set aside (kept, not loaded); `ferryctl status` lists it"
    );
    Ok(())
}

/// Every row set aside so far, oldest first. A row of the set-aside table that does not decode
/// itself is listed with what can be said of it.
pub async fn list(store: &dyn Store) -> Result<Vec<SetAsideRow>, StoreError> {
    let mut rows: Vec<SetAsideRow> = store
        .load(Table::SetAside)
        .await?
        .into_iter()
        .map(|(key, value)| {
            serde_json::from_slice(&value).unwrap_or_else(|e| SetAsideRow {
                table: Table::SetAside.name().to_owned(),
                key: key.clone(),
                reason: format!("this record of a row set aside does not decode either: {e}"),
                at_ms: 0,
                hex: hex(&value),
            })
        })
        .collect();
    rows.sort_by(|a, b| (a.at_ms, &a.table, &a.key).cmp(&(b.at_ms, &b.table, &b.key)));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn a_row_set_aside_leaves_its_table_and_keeps_its_bytes_and_reason() {
        let store = MemoryStore::default();
        let put = |key: &str, value: &[u8]| Write { table: Table::Instances, key: key.into(), value: Some(value.to_vec()) };
        store.apply(vec![put("good", b"\x0a\x01"), put("bad", b"\xff\x00garbage")]).await.expect("apply");

        set_aside(&store, Table::Instances, "bad", b"\xff\x00garbage", "invalid wire type").await.expect("sets aside");

        let left = store.load(Table::Instances).await.expect("load");
        assert_eq!(left, vec![("good".to_owned(), b"\x0a\x01".to_vec())]);
        let rows = list(&store).await.expect("lists");
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!((row.table.as_str(), row.key.as_str(), row.reason.as_str()), ("instances", "bad", "invalid wire type"));
        assert_eq!(row.hex, "ff0067617262616765");
        assert_eq!(row.len(), 9);
        assert!(row.at_ms > 0);
    }
}
