//! [`Put`] and [`Get`] chosen at run time: code that knows a kind of record only by a registry
//! entry (a function pointer per kind) writes its fields into a backend's own `Put`.

use farthing_ledger::Currency;

use crate::{DecodeError, Get, Put};

/// A `Put` chosen at run time: lets code that knows a kind of record only by a registry entry
/// (a function pointer per kind) write its fields into a backend's own `Put`.
impl Put for &mut dyn Put {
    fn id(&mut self, name: &'static str, value: u128) {
        (**self).id(name, value)
    }
    fn opt_id(&mut self, name: &'static str, value: Option<u128>) {
        (**self).opt_id(name, value)
    }
    fn int(&mut self, name: &'static str, value: u64) {
        (**self).int(name, value)
    }
    fn opt_int(&mut self, name: &'static str, value: Option<u64>) {
        (**self).opt_int(name, value)
    }
    fn wide(&mut self, name: &'static str, value: u64) {
        (**self).wide(name, value)
    }
    fn bits(&mut self, name: &'static str, value: u64) {
        (**self).bits(name, value)
    }
    fn code(&mut self, name: &'static str, value: u8) {
        (**self).code(name, value)
    }
    fn opt_code(&mut self, name: &'static str, value: Option<u8>) {
        (**self).opt_code(name, value)
    }
    fn word(&mut self, name: &'static str, value: u32) {
        (**self).word(name, value)
    }
    fn opt_word(&mut self, name: &'static str, value: Option<u32>) {
        (**self).opt_word(name, value)
    }
    fn currency(&mut self, name: &'static str, value: Currency) {
        (**self).currency(name, value)
    }
    fn flag(&mut self, name: &'static str, value: bool) {
        (**self).flag(name, value)
    }
    fn text(&mut self, name: &'static str, value: &str) {
        (**self).text(name, value)
    }
    fn opt_text(&mut self, name: &'static str, value: Option<&str>) {
        (**self).opt_text(name, value)
    }
    fn digest(&mut self, name: &'static str, value: &[u8; 32]) {
        (**self).digest(name, value)
    }
    fn blob(&mut self, name: &'static str, value: &[u8]) {
        (**self).blob(name, value)
    }
}

/// A `Get` chosen at run time, as for [`Put`].
impl Get for &mut dyn Get {
    fn id(&mut self, name: &'static str) -> Result<u128, DecodeError> {
        (**self).id(name)
    }
    fn opt_id(&mut self, name: &'static str) -> Result<Option<u128>, DecodeError> {
        (**self).opt_id(name)
    }
    fn int(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        (**self).int(name)
    }
    fn opt_int(&mut self, name: &'static str) -> Result<Option<u64>, DecodeError> {
        (**self).opt_int(name)
    }
    fn wide(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        (**self).wide(name)
    }
    fn bits(&mut self, name: &'static str) -> Result<u64, DecodeError> {
        (**self).bits(name)
    }
    fn code(&mut self, name: &'static str) -> Result<u8, DecodeError> {
        (**self).code(name)
    }
    fn opt_code(&mut self, name: &'static str) -> Result<Option<u8>, DecodeError> {
        (**self).opt_code(name)
    }
    fn word(&mut self, name: &'static str) -> Result<u32, DecodeError> {
        (**self).word(name)
    }
    fn opt_word(&mut self, name: &'static str) -> Result<Option<u32>, DecodeError> {
        (**self).opt_word(name)
    }
    fn currency(&mut self, name: &'static str) -> Result<Currency, DecodeError> {
        (**self).currency(name)
    }
    fn flag(&mut self, name: &'static str) -> Result<bool, DecodeError> {
        (**self).flag(name)
    }
    fn text(&mut self, name: &'static str) -> Result<String, DecodeError> {
        (**self).text(name)
    }
    fn opt_text(&mut self, name: &'static str) -> Result<Option<String>, DecodeError> {
        (**self).opt_text(name)
    }
    fn digest(&mut self, name: &'static str) -> Result<[u8; 32], DecodeError> {
        (**self).digest(name)
    }
    fn blob(&mut self, name: &'static str) -> Result<Vec<u8>, DecodeError> {
        (**self).blob(name)
    }
}
