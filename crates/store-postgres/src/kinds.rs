//! Tables written and read from a record's one description ([`Fields`]), with no SQL written
//! for the kind itself: rows keyed by their first column are upserted from column arrays
//! (`INSERT … SELECT FROM unnest(…) ON CONFLICT … DO UPDATE`) and loaded by key. A new kind
//! of state row needs its migration and nothing here.

use farthing_kernel::{ColumnType, Columns, Fields, Put};
use farthing_ledger::Currency;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Transaction};

use crate::PgError;
use crate::apply::{Id, id16};
use crate::rows::{columns, read};

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
    fn of<T: Fields>() -> ColumnArrays {
        let columns = Columns::list::<T>();
        ColumnArrays {
            names: columns.iter().map(|column| column.name).collect(),
            types: columns.iter().map(|column| column.ty).collect(),
            arrays: columns.iter().map(|column| Array::of(column.ty)).collect(),
            at: 0,
            misfit: None,
        }
    }

    fn add<T: Fields>(&mut self, record: &T) -> Result<(), PgError> {
        self.at = 0;
        record.put(self);
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

/// Writes `rows` into `table`, whose columns are `T`'s fields and whose key is the first of
/// them: new keys are inserted, known ones take the row's values. One statement.
pub(crate) async fn upsert<T: Fields>(
    transaction: &Transaction<'_>,
    table: &str,
    rows: &[T],
) -> Result<(), PgError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut arrays = ColumnArrays::of::<T>();
    for row in rows {
        arrays.add(row)?;
    }
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

/// The rows of `table` (whose columns are `T`'s fields, keyed by the first) with these keys.
/// With `lock`, they are locked until the transaction ends.
pub(crate) async fn load_by_keys<T: Fields + 'static>(
    transaction: &Transaction<'_>,
    table: &str,
    keys: impl Iterator<Item = u128>,
) -> Result<Vec<T>, PgError> {
    let keys: Vec<Id> = keys.map(id16).collect();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let key = Columns::list::<T>()[0].name;
    let rows: Vec<Row> = transaction
        .query_typed(
            &format!(
                "SELECT {} FROM {table} WHERE {key} = ANY($1)",
                columns::<T>()
            ),
            &[(&keys, Type::UUID_ARRAY)],
        )
        .await?;
    rows.iter().map(read).collect()
}
