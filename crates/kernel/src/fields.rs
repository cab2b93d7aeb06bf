//! One description of a record's fields, read and written by every layer.

use farthing_ledger::Currency;

/// Why bytes (or a row) are not the record they should be.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DecodeError {
    UnexpectedEnd,
    UnknownVersion(u8),
    UnknownTag(u8),
    InvalidCurrency,
    InvalidText,
    TrailingBytes,
    /// A number outside what its field allows (a count beyond `usize`, a total beyond
    /// `i64::MAX`).
    OutOfRange,
    /// Fields that each decode but do not agree with each other.
    Inconsistent(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for DecodeError {}

/// A kind of record, described by its fields in order.
///
/// `put` and `get` must name the same fields, of the same types, in the same order: the
/// round-trip tests of each kind hold them to it. A field's name is its column name in a
/// relational store; its method says how it is stored (see [`ColumnType`]).
pub trait Fields: Sized {
    fn put(&self, out: &mut impl Put);
    fn get(input: &mut impl Get) -> Result<Self, DecodeError>;
}

/// Where a record's fields go.
pub trait Put {
    /// A 128-bit id.
    fn id(&mut self, name: &'static str, value: u128);
    fn opt_id(&mut self, name: &'static str, value: Option<u128>);
    /// A count, amount, total or time. Those a store keeps never exceed `i64::MAX`, so that
    /// they fit a signed 64-bit column anywhere.
    fn int(&mut self, name: &'static str, value: u64);
    fn opt_int(&mut self, name: &'static str, value: Option<u64>);
    /// Any `u64`, to `u64::MAX`.
    fn wide(&mut self, name: &'static str, value: u64);
    /// A 64-bit key (an account id): any `u64`, kept bit-cast in a signed 64-bit column.
    fn bits(&mut self, name: &'static str, value: u64);
    /// A small code: a tag or a kind.
    fn code(&mut self, name: &'static str, value: u8);
    fn opt_code(&mut self, name: &'static str, value: Option<u8>);
    /// Any `u32`.
    fn word(&mut self, name: &'static str, value: u32);
    fn opt_word(&mut self, name: &'static str, value: Option<u32>);
    fn currency(&mut self, name: &'static str, value: Currency);
    fn flag(&mut self, name: &'static str, value: bool);
    fn text(&mut self, name: &'static str, value: &str);
    fn opt_text(&mut self, name: &'static str, value: Option<&str>);
    /// A SHA-256 digest.
    fn digest(&mut self, name: &'static str, value: &[u8; 32]);
    /// Bytes with a form of their own (an encoded answer, say).
    fn blob(&mut self, name: &'static str, value: &[u8]);
}

/// Where a record's fields come from, in the order [`Put`] wrote them.
pub trait Get {
    fn id(&mut self, name: &'static str) -> Result<u128, DecodeError>;
    fn opt_id(&mut self, name: &'static str) -> Result<Option<u128>, DecodeError>;
    fn int(&mut self, name: &'static str) -> Result<u64, DecodeError>;
    fn opt_int(&mut self, name: &'static str) -> Result<Option<u64>, DecodeError>;
    fn wide(&mut self, name: &'static str) -> Result<u64, DecodeError>;
    fn bits(&mut self, name: &'static str) -> Result<u64, DecodeError>;
    fn code(&mut self, name: &'static str) -> Result<u8, DecodeError>;
    fn opt_code(&mut self, name: &'static str) -> Result<Option<u8>, DecodeError>;
    fn word(&mut self, name: &'static str) -> Result<u32, DecodeError>;
    fn opt_word(&mut self, name: &'static str) -> Result<Option<u32>, DecodeError>;
    fn currency(&mut self, name: &'static str) -> Result<Currency, DecodeError>;
    fn flag(&mut self, name: &'static str) -> Result<bool, DecodeError>;
    fn text(&mut self, name: &'static str) -> Result<String, DecodeError>;
    fn opt_text(&mut self, name: &'static str) -> Result<Option<String>, DecodeError>;
    fn digest(&mut self, name: &'static str) -> Result<[u8; 32], DecodeError>;
    fn blob(&mut self, name: &'static str) -> Result<Vec<u8>, DecodeError>;
}

/// The binary form: fixed-width little-endian numbers, a tag byte before an optional value,
/// texts and blobs after their length as a `u32`. Names are not written.
pub struct Binary<'a>(pub &'a mut Vec<u8>);

impl Binary<'_> {
    /// The binary form of one record.
    pub fn encode<T: Fields>(record: &T) -> Vec<u8> {
        // Room for most records at once: growing a vector byte by byte reallocates it several
        // times per record, which a checkpoint of a million rows feels.
        let mut out = Vec::with_capacity(256);
        record.put(&mut Binary(&mut out));
        out
    }

    pub fn u8(&mut self, value: u8) {
        self.0.push(value);
    }
    pub fn u32(&mut self, value: u32) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    pub fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    pub fn u128(&mut self, value: u128) {
        self.0.extend_from_slice(&value.to_le_bytes());
    }
    pub fn bytes(&mut self, value: &[u8]) {
        self.u32(u32::try_from(value.len()).expect("stored bytes are bounded"));
        self.0.extend_from_slice(value);
    }
    fn some(&mut self, present: bool) {
        self.u8(u8::from(present));
    }
}

impl Put for Binary<'_> {
    fn id(&mut self, _: &'static str, value: u128) {
        self.u128(value);
    }
    fn opt_id(&mut self, _: &'static str, value: Option<u128>) {
        self.some(value.is_some());
        if let Some(value) = value {
            self.u128(value);
        }
    }
    fn int(&mut self, _: &'static str, value: u64) {
        // The binary form keeps any value: a command the state refuses (an amount beyond
        // what the ledger keeps, say) is still journaled and must read back as it was.
        self.u64(value);
    }
    fn opt_int(&mut self, name: &'static str, value: Option<u64>) {
        self.some(value.is_some());
        if let Some(value) = value {
            self.int(name, value);
        }
    }
    fn wide(&mut self, _: &'static str, value: u64) {
        self.u64(value);
    }
    fn bits(&mut self, _: &'static str, value: u64) {
        self.u64(value);
    }
    fn code(&mut self, _: &'static str, value: u8) {
        self.u8(value);
    }
    fn opt_code(&mut self, _: &'static str, value: Option<u8>) {
        // A code of 0 means "none" in the binary form, as the journal has always written it.
        self.u8(value.map_or(0, |code| {
            assert!(code != 0, "code 0 stands for none");
            code
        }));
    }
    fn word(&mut self, _: &'static str, value: u32) {
        self.u32(value);
    }
    fn opt_word(&mut self, _: &'static str, value: Option<u32>) {
        self.some(value.is_some());
        if let Some(value) = value {
            self.u32(value);
        }
    }
    fn currency(&mut self, _: &'static str, value: Currency) {
        self.u32(value.to_u32());
    }
    fn flag(&mut self, _: &'static str, value: bool) {
        self.u8(u8::from(value));
    }
    fn text(&mut self, _: &'static str, value: &str) {
        self.bytes(value.as_bytes());
    }
    fn opt_text(&mut self, _: &'static str, value: Option<&str>) {
        self.some(value.is_some());
        if let Some(value) = value {
            self.bytes(value.as_bytes());
        }
    }
    fn digest(&mut self, _: &'static str, value: &[u8; 32]) {
        self.0.extend_from_slice(value);
    }
    fn blob(&mut self, _: &'static str, value: &[u8]) {
        self.bytes(value);
    }
}

/// Reads the binary form.
pub struct BinaryReader<'a>(pub &'a [u8]);

impl<'a> BinaryReader<'a> {
    /// One whole record: bytes left over are an error.
    pub fn decode<T: Fields>(bytes: &[u8]) -> Result<T, DecodeError> {
        let mut reader = BinaryReader(bytes);
        let record = T::get(&mut reader)?;
        reader.finish()?;
        Ok(record)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        if self.0.len() < N {
            return Err(DecodeError::UnexpectedEnd);
        }
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        Ok(head.try_into().expect("split at N"))
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    pub fn u128(&mut self) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.take()?))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.u32()?).map_err(|_| DecodeError::OutOfRange)?;
        if self.0.len() < len {
            return Err(DecodeError::UnexpectedEnd);
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }
    /// Whether an optional value follows.
    fn some(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            tag => Err(DecodeError::UnknownTag(tag)),
        }
    }
}

impl Get for BinaryReader<'_> {
    fn id(&mut self, _: &'static str) -> Result<u128, DecodeError> {
        self.u128()
    }
    fn opt_id(&mut self, name: &'static str) -> Result<Option<u128>, DecodeError> {
        if self.some()? {
            self.id(name).map(Some)
        } else {
            Ok(None)
        }
    }
    fn int(&mut self, _: &'static str) -> Result<u64, DecodeError> {
        self.u64()
    }
    fn opt_int(&mut self, name: &'static str) -> Result<Option<u64>, DecodeError> {
        if self.some()? {
            self.int(name).map(Some)
        } else {
            Ok(None)
        }
    }
    fn wide(&mut self, _: &'static str) -> Result<u64, DecodeError> {
        self.u64()
    }
    fn bits(&mut self, _: &'static str) -> Result<u64, DecodeError> {
        self.u64()
    }
    fn code(&mut self, _: &'static str) -> Result<u8, DecodeError> {
        self.u8()
    }
    fn opt_code(&mut self, _: &'static str) -> Result<Option<u8>, DecodeError> {
        Ok(match self.u8()? {
            0 => None,
            code => Some(code),
        })
    }
    fn word(&mut self, _: &'static str) -> Result<u32, DecodeError> {
        self.u32()
    }
    fn opt_word(&mut self, name: &'static str) -> Result<Option<u32>, DecodeError> {
        if self.some()? {
            self.word(name).map(Some)
        } else {
            Ok(None)
        }
    }
    fn currency(&mut self, _: &'static str) -> Result<Currency, DecodeError> {
        Currency::from_u32(self.u32()?).ok_or(DecodeError::InvalidCurrency)
    }
    fn flag(&mut self, _: &'static str) -> Result<bool, DecodeError> {
        self.some()
    }
    fn text(&mut self, _: &'static str) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError::InvalidText)
    }
    fn opt_text(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        if self.some()? {
            self.text(name).map(Some)
        } else {
            Ok(None)
        }
    }
    fn digest(&mut self, _: &'static str) -> Result<[u8; 32], DecodeError> {
        self.take()
    }
    fn blob(&mut self, _: &'static str) -> Result<Vec<u8>, DecodeError> {
        Ok(self.bytes()?.to_vec())
    }
}

/// How a field is kept in a relational store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ColumnType {
    /// `UUID`: 16 bytes, big-endian.
    Id,
    /// `BIGINT`.
    Int,
    /// `NUMERIC(20, 0)`: any `u64`.
    Wide,
    /// `BIGINT`, the `u64` bit-cast.
    Bits,
    /// `SMALLINT`.
    Code,
    /// `INTEGER`, the `u32` bit-cast.
    Word,
    /// `CHAR(3)`.
    Currency,
    /// `BOOLEAN`.
    Flag,
    /// `TEXT`.
    Text,
    /// `BYTEA`.
    Bytes,
}

impl ColumnType {
    /// The SQL type of such a column.
    pub fn sql(self) -> &'static str {
        match self {
            ColumnType::Id => "UUID",
            ColumnType::Int => "BIGINT",
            ColumnType::Wide => "NUMERIC(20, 0)",
            ColumnType::Bits => "BIGINT",
            ColumnType::Code => "SMALLINT",
            ColumnType::Word => "INTEGER",
            ColumnType::Currency => "CHAR(3)",
            ColumnType::Flag => "BOOLEAN",
            ColumnType::Text => "TEXT",
            ColumnType::Bytes => "BYTEA",
        }
    }
}

/// A record's column, in a relational store.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Column {
    pub name: &'static str,
    pub ty: ColumnType,
    pub nullable: bool,
}

/// Lists a record's columns, in order.
#[derive(Default)]
pub struct Columns(pub Vec<Column>);

impl Columns {
    /// The columns of a kind of record, read off one of its values.
    pub fn of<T: Fields>(example: &T) -> Vec<Column> {
        let mut columns = Columns::default();
        example.put(&mut columns);
        columns.0
    }

    /// The columns of a kind of record, as its [`Fields::get`] asks for them when fed
    /// neutral values (ids and numbers 0, codes 1, `USD`, empty texts and blobs, nothing for
    /// every option). What the reader makes of those values does not matter, so a reader
    /// must ask for all its fields before it checks any of them against the others; each
    /// kind's tests compare this list with [`Columns::of`] a real record.
    pub fn list<T: Fields>() -> Vec<Column> {
        let mut columns = Columns::default();
        let _ = T::get(&mut columns);
        columns.0
    }

    fn push(&mut self, name: &'static str, ty: ColumnType, nullable: bool) {
        assert!(
            self.0.iter().all(|column| column.name != name),
            "column {name} is named twice"
        );
        self.0.push(Column { name, ty, nullable });
    }
}

impl Put for Columns {
    fn id(&mut self, name: &'static str, _: u128) {
        self.push(name, ColumnType::Id, false);
    }
    fn opt_id(&mut self, name: &'static str, _: Option<u128>) {
        self.push(name, ColumnType::Id, true);
    }
    fn int(&mut self, name: &'static str, _: u64) {
        self.push(name, ColumnType::Int, false);
    }
    fn opt_int(&mut self, name: &'static str, _: Option<u64>) {
        self.push(name, ColumnType::Int, true);
    }
    fn wide(&mut self, name: &'static str, _: u64) {
        self.push(name, ColumnType::Wide, false);
    }
    fn bits(&mut self, name: &'static str, _: u64) {
        self.push(name, ColumnType::Bits, false);
    }
    fn code(&mut self, name: &'static str, _: u8) {
        self.push(name, ColumnType::Code, false);
    }
    fn opt_code(&mut self, name: &'static str, _: Option<u8>) {
        self.push(name, ColumnType::Code, true);
    }
    fn word(&mut self, name: &'static str, _: u32) {
        self.push(name, ColumnType::Word, false);
    }
    fn opt_word(&mut self, name: &'static str, _: Option<u32>) {
        self.push(name, ColumnType::Word, true);
    }
    fn currency(&mut self, name: &'static str, _: Currency) {
        self.push(name, ColumnType::Currency, false);
    }
    fn flag(&mut self, name: &'static str, _: bool) {
        self.push(name, ColumnType::Flag, false);
    }
    fn text(&mut self, name: &'static str, _: &str) {
        self.push(name, ColumnType::Text, false);
    }
    fn opt_text(&mut self, name: &'static str, _: Option<&str>) {
        self.push(name, ColumnType::Text, true);
    }
    fn digest(&mut self, name: &'static str, _: &[u8; 32]) {
        self.push(name, ColumnType::Bytes, false);
    }
    fn blob(&mut self, name: &'static str, _: &[u8]) {
        self.push(name, ColumnType::Bytes, false);
    }
}

impl Get for Columns {
    fn id(&mut self, name: &'static str) -> Result<u128, DecodeError> {
        self.push(name, ColumnType::Id, false);
        Ok(0)
    }
    fn opt_id(&mut self, name: &'static str) -> Result<Option<u128>, DecodeError> {
        self.push(name, ColumnType::Id, true);
        Ok(None)
    }
    fn int(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        self.push(name, ColumnType::Int, false);
        Ok(0)
    }
    fn opt_int(&mut self, name: &'static str) -> Result<Option<u64>, DecodeError> {
        self.push(name, ColumnType::Int, true);
        Ok(None)
    }
    fn wide(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        self.push(name, ColumnType::Wide, false);
        Ok(0)
    }
    fn bits(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        self.push(name, ColumnType::Bits, false);
        Ok(0)
    }
    fn code(&mut self, name: &'static str) -> Result<u8, DecodeError> {
        self.push(name, ColumnType::Code, false);
        Ok(1)
    }
    fn opt_code(&mut self, name: &'static str) -> Result<Option<u8>, DecodeError> {
        self.push(name, ColumnType::Code, true);
        Ok(None)
    }
    fn word(&mut self, name: &'static str) -> Result<u32, DecodeError> {
        self.push(name, ColumnType::Word, false);
        Ok(0)
    }
    fn opt_word(&mut self, name: &'static str) -> Result<Option<u32>, DecodeError> {
        self.push(name, ColumnType::Word, true);
        Ok(None)
    }
    fn currency(&mut self, name: &'static str) -> Result<Currency, DecodeError> {
        self.push(name, ColumnType::Currency, false);
        Ok(Currency::parse("USD").expect("USD is a currency"))
    }
    fn flag(&mut self, name: &'static str) -> Result<bool, DecodeError> {
        self.push(name, ColumnType::Flag, false);
        Ok(false)
    }
    fn text(&mut self, name: &'static str) -> Result<String, DecodeError> {
        self.push(name, ColumnType::Text, false);
        Ok(String::new())
    }
    fn opt_text(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        self.push(name, ColumnType::Text, true);
        Ok(None)
    }
    fn digest(&mut self, name: &'static str) -> Result<[u8; 32], DecodeError> {
        self.push(name, ColumnType::Bytes, false);
        Ok([0; 32])
    }
    fn blob(&mut self, name: &'static str) -> Result<Vec<u8>, DecodeError> {
        self.push(name, ColumnType::Bytes, false);
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    fn one_value() -> Every {
        every()
            .new_tree(&mut TestRunner::deterministic())
            .expect("a value")
            .current()
    }

    #[derive(Clone, Debug, PartialEq)]
    struct Every {
        id: u128,
        opt_id: Option<u128>,
        int: u64,
        opt_int: Option<u64>,
        wide: u64,
        code: u8,
        opt_code: Option<u8>,
        word: u32,
        opt_word: Option<u32>,
        flag: bool,
        text: String,
        opt_text: Option<String>,
        digest: [u8; 32],
        blob: Vec<u8>,
    }

    impl Fields for Every {
        fn put(&self, out: &mut impl Put) {
            out.id("id", self.id);
            out.opt_id("opt_id", self.opt_id);
            out.int("int", self.int);
            out.opt_int("opt_int", self.opt_int);
            out.wide("wide", self.wide);
            out.code("code", self.code);
            out.opt_code("opt_code", self.opt_code);
            out.word("word", self.word);
            out.opt_word("opt_word", self.opt_word);
            out.currency("currency", Currency::parse("EUR").unwrap());
            out.flag("flag", self.flag);
            out.text("text", &self.text);
            out.opt_text("opt_text", self.opt_text.as_deref());
            out.digest("digest", &self.digest);
            out.blob("blob", &self.blob);
        }
        fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
            let every = Every {
                id: input.id("id")?,
                opt_id: input.opt_id("opt_id")?,
                int: input.int("int")?,
                opt_int: input.opt_int("opt_int")?,
                wide: input.wide("wide")?,
                code: input.code("code")?,
                opt_code: input.opt_code("opt_code")?,
                word: input.word("word")?,
                opt_word: input.opt_word("opt_word")?,
                flag: {
                    // Always EUR in the binary tests; the currency field is covered there.
                    input.currency("currency")?;
                    input.flag("flag")?
                },
                text: input.text("text")?,
                opt_text: input.opt_text("opt_text")?,
                digest: input.digest("digest")?,
                blob: input.blob("blob")?,
            };
            Ok(every)
        }
    }

    fn every() -> impl Strategy<Value = Every> {
        (
            (
                any::<u128>(),
                any::<Option<u128>>(),
                any::<u64>(),
                any::<Option<u64>>(),
                any::<u64>(),
                any::<u8>(),
                proptest::option::of(1..=u8::MAX),
            ),
            (
                any::<u32>(),
                any::<Option<u32>>(),
                any::<bool>(),
                ".{0,12}",
                proptest::option::of(".{0,12}"),
                any::<[u8; 32]>(),
                proptest::collection::vec(any::<u8>(), 0..40),
            ),
        )
            .prop_map(|((id, opt_id, int, opt_int, wide, code, opt_code), rest)| {
                let (word, opt_word, flag, text, opt_text, digest, blob) = rest;
                Every {
                    id,
                    opt_id,
                    int,
                    opt_int,
                    wide,
                    code,
                    opt_code,
                    word,
                    opt_word,
                    flag,
                    text,
                    opt_text,
                    digest,
                    blob,
                }
            })
    }

    proptest! {
        #[test]
        fn every_field_type_round_trips_through_the_binary_form(value in every()) {
            let bytes = Binary::encode(&value);
            prop_assert_eq!(BinaryReader::decode::<Every>(&bytes), Ok(value));
        }

        #[test]
        fn a_record_cut_short_is_refused_and_never_panics(value in every(), cut in 0usize..200) {
            let bytes = Binary::encode(&value);
            let cut = cut.min(bytes.len());
            if cut < bytes.len() {
                prop_assert!(BinaryReader::decode::<Every>(&bytes[..cut]).is_err());
            }
        }
    }

    #[test]
    fn bytes_left_over_are_refused() {
        let value = one_value();
        let mut bytes = Binary::encode(&value);
        bytes.push(0);
        assert_eq!(
            BinaryReader::decode::<Every>(&bytes),
            Err(DecodeError::TrailingBytes)
        );
    }

    #[test]
    fn columns_list_every_field_with_its_sql_type_in_order() {
        let value = one_value();
        let columns = Columns::of(&value);
        let names: Vec<_> = columns.iter().map(|column| column.name).collect();
        assert_eq!(
            names,
            [
                "id", "opt_id", "int", "opt_int", "wide", "code", "opt_code", "word", "opt_word",
                "currency", "flag", "text", "opt_text", "digest", "blob"
            ]
        );
        assert_eq!(columns[1].ty.sql(), "UUID");
        assert!(columns[1].nullable);
        assert_eq!(columns[4].ty.sql(), "NUMERIC(20, 0)");
        assert!(!columns[4].nullable);
        assert_eq!(
            Columns::list::<Every>(),
            columns,
            "reading lists what writing does"
        );
    }
}
