//! Tables written and read from a record's one description (`Fields`), with no SQL written
//! for the kind itself: rows keyed by their first column are upserted from column arrays
//! (`INSERT … SELECT FROM unnest(…) ON CONFLICT … DO UPDATE`) and loaded by key. Every kind
//! registered in `farthing_payments::kinds::KINDS` is kept this way: a new kind of state row
//! needs its migration and nothing here.

use farthing_kernel::{Column, ColumnType, Put};
use farthing_ledger::Currency;
use farthing_payments::StoredRow;
use farthing_payments::kinds::KindInfo;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row, Transaction};

use crate::PgError;
use crate::apply::{Id, id16};

/// One column's values across the rows of a statement, typed as PostgreSQL binds them.
enum Array {
    Id(Vec<Option<Id>>),
    Int(Vec<Option<i64>>),
    Code(Vec<Option<i16>>),
    Word(Vec<Option<i32>>),
    Flag(Vec<Option<bool>>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Array {
    fn of(ty: ColumnType) -> Array {
        match ty {
            ColumnType::Id => Array::Id(Vec::new()),
            ColumnType::Int | ColumnType::Bits => Array::Int(Vec::new()),
            ColumnType::Code => Array::Code(Vec::new()),
            ColumnType::Word => Array::Word(Vec::new()),
            ColumnType::Flag => Array::Flag(Vec::new()),
            // `NUMERIC` and `CHAR(3)` go in as text, cast in the statement.
            ColumnType::Wide | ColumnType::Currency | ColumnType::Text => Array::Text(Vec::new()),
            ColumnType::Bytes => Array::Bytes(Vec::new()),
        }
    }

    /// The array's type, and the cast its column needs after `unnest`.
    fn sql(ty: ColumnType) -> (&'static str, &'static str) {
        match ty {
            ColumnType::Id => ("UUID[]", ""),
            ColumnType::Int | ColumnType::Bits => ("BIGINT[]", ""),
            ColumnType::Code => ("SMALLINT[]", ""),
            ColumnType::Word => ("INTEGER[]", ""),
            ColumnType::Flag => ("BOOLEAN[]", ""),
            ColumnType::Wide => ("TEXT[]", "::NUMERIC"),
            ColumnType::Currency => ("TEXT[]", "::CHAR(3)"),
            ColumnType::Text => ("TEXT[]", ""),
            ColumnType::Bytes => ("BYTEA[]", ""),
        }
    }

    fn param(&self) -> (&(dyn ToSql + Sync), Type) {
        match self {
            Array::Id(values) => (values, Type::UUID_ARRAY),
            Array::Int(values) => (values, Type::INT8_ARRAY),
            Array::Code(values) => (values, Type::INT2_ARRAY),
            Array::Word(values) => (values, Type::INT4_ARRAY),
            Array::Flag(values) => (values, Type::BOOL_ARRAY),
            Array::Text(values) => (values, Type::TEXT_ARRAY),
            Array::Bytes(values) => (values, Type::BYTEA_ARRAY),
        }
    }
}

/// The rows of one kind as column arrays: each record's fields go, in order, to the next
/// column.
struct ColumnArrays {
    names: Vec<&'static str>,
    types: Vec<ColumnType>,
    arrays: Vec<Array>,
    at: usize,
    /// The first field that did not fit its column.
    misfit: Option<&'static str>,
}

impl ColumnArrays {
    fn of_columns(columns: &[Column]) -> ColumnArrays {
        ColumnArrays {
            names: columns.iter().map(|column| column.name).collect(),
            types: columns.iter().map(|column| column.ty).collect(),
            arrays: columns.iter().map(|column| Array::of(column.ty)).collect(),
            at: 0,
            misfit: None,
        }
    }

    /// Adds a row of a registered kind, from its stored form.
    fn add_stored(&mut self, info: &KindInfo, bytes: &[u8]) -> Result<(), PgError> {
        self.at = 0;
        (info.put)(bytes, self)
            .map_err(|error| PgError::Stored(format!("a {} row: {error}", info.table)))?;
        self.finish_row()
    }

    fn finish_row(&mut self) -> Result<(), PgError> {
        if self.at != self.arrays.len() {
            return Err(PgError::Stored(format!(
                "a record put {} fields for {} columns",
                self.at,
                self.arrays.len()
            )));
        }
        match self.misfit {
            Some(name) => Err(PgError::Stored(format!("{name} does not fit its column"))),
            None => Ok(()),
        }
    }

    fn next(&mut self, name: &'static str) -> Option<&mut Array> {
        let at = self.at;
        self.at += 1;
        if self.names.get(at) != Some(&name) {
            self.misfit.get_or_insert(name);
            return None;
        }
        self.arrays.get_mut(at)
    }

    fn int(&mut self, name: &'static str, value: Option<u64>) {
        let value = value.map(i64::try_from).transpose();
        match (self.next(name), value) {
            (Some(Array::Int(values)), Ok(value)) => values.push(value),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }

    fn text(&mut self, name: &'static str, value: Option<String>) {
        match self.next(name) {
            Some(Array::Text(values)) => values.push(value),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }
}

impl Put for ColumnArrays {
    fn id(&mut self, name: &'static str, value: u128) {
        self.opt_id(name, Some(value));
    }
    fn opt_id(&mut self, name: &'static str, value: Option<u128>) {
        match self.next(name) {
            Some(Array::Id(values)) => values.push(value.map(id16)),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }
    fn int(&mut self, name: &'static str, value: u64) {
        ColumnArrays::int(self, name, Some(value));
    }
    fn opt_int(&mut self, name: &'static str, value: Option<u64>) {
        ColumnArrays::int(self, name, value);
    }
    fn wide(&mut self, name: &'static str, value: u64) {
        ColumnArrays::text(self, name, Some(value.to_string()));
    }
    fn bits(&mut self, name: &'static str, value: u64) {
        match self.next(name) {
            Some(Array::Int(values)) => values.push(Some(value as i64)),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }
    fn code(&mut self, name: &'static str, value: u8) {
        self.opt_code(name, Some(value));
    }
    fn opt_code(&mut self, name: &'static str, value: Option<u8>) {
        match self.next(name) {
            Some(Array::Code(values)) => values.push(value.map(i16::from)),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }
    fn word(&mut self, name: &'static str, value: u32) {
        self.opt_word(name, Some(value));
    }
    fn opt_word(&mut self, name: &'static str, value: Option<u32>) {
        match self.next(name) {
            Some(Array::Word(values)) => values.push(value.map(|value| value as i32)),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }
    fn currency(&mut self, name: &'static str, value: Currency) {
        ColumnArrays::text(self, name, Some(value.as_str().to_string()));
    }
    fn flag(&mut self, name: &'static str, value: bool) {
        match self.next(name) {
            Some(Array::Flag(values)) => values.push(Some(value)),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }
    fn text(&mut self, name: &'static str, value: &str) {
        ColumnArrays::text(self, name, Some(value.to_string()));
    }
    fn opt_text(&mut self, name: &'static str, value: Option<&str>) {
        ColumnArrays::text(self, name, value.map(str::to_string));
    }
    fn digest(&mut self, name: &'static str, value: &[u8; 32]) {
        self.blob(name, value);
    }
    fn blob(&mut self, name: &'static str, value: &[u8]) {
        match self.next(name) {
            Some(Array::Bytes(values)) => values.push(Some(value.to_vec())),
            _ => {
                self.misfit.get_or_insert(name);
            }
        }
    }
}

/// Writes the changed rows of every registered kind into its table.
pub(crate) async fn upsert_stored(
    transaction: &Transaction<'_>,
    rows: &[StoredRow],
) -> Result<(), PgError> {
    for info in farthing_payments::kinds::KINDS {
        if let Some(arrays) = arrays_of_kind(info, rows)? {
            upsert_arrays(transaction, info.table, &arrays).await?;
        }
    }
    Ok(())
}

/// The rows of one kind among `rows`, as column arrays; `None` when there are none.
fn arrays_of_kind(info: &KindInfo, rows: &[StoredRow]) -> Result<Option<ColumnArrays>, PgError> {
    let mut arrays = None;
    for row in rows {
        if row.tag == info.tag {
            arrays
                .get_or_insert_with(|| ColumnArrays::of_columns(&(info.columns)()))
                .add_stored(info, &row.bytes)?;
        }
    }
    Ok(arrays)
}

async fn upsert_arrays(
    transaction: &Transaction<'_>,
    table: &str,
    arrays: &ColumnArrays,
) -> Result<(), PgError> {
    let names = &arrays.names;
    let unnest: Vec<String> = arrays
        .types
        .iter()
        .enumerate()
        .map(|(at, ty)| format!("${}::{}", at + 1, Array::sql(*ty).0))
        .collect();
    let select: Vec<String> = names
        .iter()
        .zip(&arrays.types)
        .map(|(name, ty)| format!("{name}{}", Array::sql(*ty).1))
        .collect();
    let updates: Vec<String> = names[1..]
        .iter()
        .map(|name| format!("{name} = EXCLUDED.{name}"))
        .collect();
    let conflict = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    let sql = format!(
        "INSERT INTO {table} ({columns}) SELECT {select} FROM unnest({unnest}) AS u({columns})
         ON CONFLICT ({key}) {conflict}",
        columns = names.join(", "),
        select = select.join(", "),
        unnest = unnest.join(", "),
        key = names[0],
    );
    let params: Vec<(&(dyn ToSql + Sync), Type)> = arrays.arrays.iter().map(Array::param).collect();
    transaction.execute_typed(&sql, &params).await?;
    Ok(())
}

/// The rows of a registered kind with these ids, locked in id order until the transaction
/// ends, in their stored form.
pub(crate) async fn load_stored(
    transaction: &Transaction<'_>,
    info: &KindInfo,
    ids: impl Iterator<Item = u128>,
) -> Result<Vec<StoredRow>, PgError> {
    let ids: Vec<Id> = ids.map(id16).collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let columns = (info.columns)();
    let key = columns[0].name;
    let rows: Vec<Row> = transaction
        .query_typed(
            &format!(
                "SELECT {} FROM {} WHERE {key} = ANY($1) ORDER BY {key} FOR UPDATE",
                select_list(&columns),
                info.table
            ),
            &[(&ids, Type::UUID_ARRAY)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let (id, bytes) = crate::rows::read_with(row, info.get)?;
            Ok(StoredRow {
                tag: info.tag,
                id,
                bytes,
            })
        })
        .collect()
}

/// The row of the registered kind `tag` under `id`, unlocked (a read of the API's).
pub(crate) async fn row(
    client: &impl GenericClient,
    tag: u8,
    id: u128,
) -> Result<Option<StoredRow>, PgError> {
    let Some(info) = KindInfo::of_tag(tag) else {
        return Ok(None);
    };
    let columns = (info.columns)();
    let sql = format!(
        "SELECT {} FROM {} WHERE {} = $1",
        select_list(&columns),
        info.table,
        columns[0].name
    );
    let row = client
        .query_typed_opt(&sql, &[(&id16(id), Type::UUID)])
        .await?;
    row.map(|row| {
        let (id, bytes) = crate::rows::read_with(&row, info.get)?;
        Ok(StoredRow {
            tag: info.tag,
            id,
            bytes,
        })
    })
    .transpose()
}

/// Every row of a registered kind, by id, as an export reads them.
pub(crate) fn export_sql(info: &KindInfo) -> String {
    let columns = (info.columns)();
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        select_list(&columns),
        info.table,
        columns[0].name
    )
}

/// A select list for these columns, those the driver does not read as such cast to text.
pub(crate) fn select_list(columns: &[Column]) -> String {
    columns
        .iter()
        .map(|column| match column.ty {
            ColumnType::Wide | ColumnType::Currency => format!("{}::TEXT", column.name),
            _ => column.name.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
