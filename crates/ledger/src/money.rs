//! Money: [`Amount`] in micro-units and ISO 4217 [`Currency`] codes.

use std::fmt;

/// Micro-units in one currency unit: amounts carry six decimal places.
pub const MICROS_PER_UNIT: u64 = 1_000_000;
/// Fractional digits an amount may carry.
pub const AMOUNT_DECIMALS_MAX: usize = 6;

/// A non-negative quantity of money in micro-units (a millionth of a currency unit).
///
/// There is deliberately no `Add`, `Sub` or `Default`: every arithmetic step is checked and
/// says what happens on overflow.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Amount(u64);

/// Why a decimal string is not an amount.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AmountParseError {
    Empty,
    InvalidCharacter,
    TooManyDecimals,
    TooLarge,
}

impl fmt::Display for AmountParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AmountParseError::Empty => "the amount is empty",
            AmountParseError::InvalidCharacter => {
                "the amount must be a plain decimal such as \"0.0025\" (digits and one point)"
            }
            AmountParseError::TooManyDecimals => "the amount has more than 6 decimal places",
            AmountParseError::TooLarge => "the amount is too large",
        })
    }
}

impl Amount {
    pub const ZERO: Amount = Amount(0);
    /// The largest amount: totals are kept in `u64` micro-units.
    pub const MAX: Amount = Amount(u64::MAX);

    pub const fn from_micros(micros: u64) -> Amount {
        Amount(micros)
    }

    pub const fn micros(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    /// `floor(self × numerator / denominator)`, computed without overflow.
    /// `None` when the denominator is zero or the result does not fit.
    pub fn mul_div_floor(self, numerator: u64, denominator: u64) -> Option<Amount> {
        if denominator == 0 {
            return None;
        }
        let product = u128::from(self.0) * u128::from(numerator);
        u64::try_from(product / u128::from(denominator))
            .ok()
            .map(Amount)
    }

    /// Parses a plain decimal string (`"12"`, `"0.0025"`, `"1.5"`) into micro-units.
    /// Signs, exponents, spaces, and more than six decimals are rejected.
    pub fn parse_decimal(text: &str) -> Result<Amount, AmountParseError> {
        if text.is_empty() {
            return Err(AmountParseError::Empty);
        }
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (text, None),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AmountParseError::InvalidCharacter);
        }
        let mut micros: u64 = 0;
        for digit in whole.bytes() {
            micros = micros
                .checked_mul(10)
                .and_then(|m| m.checked_add(u64::from(digit - b'0')))
                .ok_or(AmountParseError::TooLarge)?;
        }
        micros = micros
            .checked_mul(MICROS_PER_UNIT)
            .ok_or(AmountParseError::TooLarge)?;
        if let Some(fraction) = fraction {
            if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return Err(AmountParseError::InvalidCharacter);
            }
            if fraction.len() > AMOUNT_DECIMALS_MAX {
                return Err(AmountParseError::TooManyDecimals);
            }
            let mut fractional: u64 = 0;
            for digit in fraction.bytes() {
                fractional = fractional * 10 + u64::from(digit - b'0');
            }
            for _ in fraction.len()..AMOUNT_DECIMALS_MAX {
                fractional *= 10;
            }
            micros = micros
                .checked_add(fractional)
                .ok_or(AmountParseError::TooLarge)?;
        }
        Ok(Amount(micros))
    }
}

/// Renders the canonical decimal form: at least two decimals, at most six, no trailing zeros
/// beyond the second (`"1.00"`, `"0.0025"`, `"0.000001"`).
impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / MICROS_PER_UNIT;
        let fraction = self.0 % MICROS_PER_UNIT;
        let digits = format!("{fraction:06}");
        let trimmed = digits.trim_end_matches('0');
        let shown = if trimmed.len() < 2 {
            &digits[..2]
        } else {
            trimmed
        };
        write!(f, "{whole}.{shown}")
    }
}

/// An ISO 4217 alphabetic currency code (`USD`, `EUR`, `KES`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

/// Hashed as one integer: currencies are part of hot map keys (an owner's account per
/// currency), and hashing three bytes as a slice costs a length and a byte loop.
impl std::hash::Hash for Currency {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u32(self.to_u32());
    }
}

/// Active ISO 4217 codes that Farthing knows, sorted. An operator enables a subset of them.
const ISO_4217_CODES: &[&str] = &[
    "AED", "ARS", "AUD", "BDT", "BRL", "CAD", "CHF", "CLP", "CNY", "COP", "CZK", "DKK", "EGP",
    "EUR", "GBP", "GHS", "HKD", "HUF", "IDR", "ILS", "INR", "JPY", "KES", "KRW", "MAD", "MXN",
    "MYR", "NGN", "NOK", "NZD", "PEN", "PHP", "PKR", "PLN", "RON", "RWF", "SAR", "SEK", "SGD",
    "THB", "TRY", "TWD", "TZS", "UAH", "UGX", "USD", "VND", "XAF", "XOF", "ZAR", "ZMW",
];

impl Currency {
    /// Parses an uppercase ISO 4217 code that Farthing knows.
    pub fn parse(code: &str) -> Option<Currency> {
        if ISO_4217_CODES.binary_search(&code).is_ok() {
            let bytes = code.as_bytes();
            Some(Currency([bytes[0], bytes[1], bytes[2]]))
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII codes from the table above are ever constructed.
        std::str::from_utf8(&self.0).expect("currency codes are ASCII")
    }

    /// A compact integer form for storage codecs.
    pub fn to_u32(self) -> u32 {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], 0])
    }

    pub fn from_u32(value: u32) -> Option<Currency> {
        let b = value.to_le_bytes();
        let code = std::str::from_utf8(&b[..3]).ok()?;
        if b[3] != 0 {
            return None;
        }
        Currency::parse(code)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_parse_to_micro_units() {
        assert_eq!(Amount::parse_decimal("0.0025"), Ok(Amount(2_500)));
        assert_eq!(Amount::parse_decimal("12"), Ok(Amount(12_000_000)));
        assert_eq!(Amount::parse_decimal("1.5"), Ok(Amount(1_500_000)));
        assert_eq!(Amount::parse_decimal("0.000001"), Ok(Amount(1)));
        assert_eq!(Amount::parse_decimal("0"), Ok(Amount(0)));
    }

    #[test]
    fn malformed_amounts_are_rejected_with_a_reason() {
        use AmountParseError::*;
        assert_eq!(Amount::parse_decimal(""), Err(Empty));
        assert_eq!(Amount::parse_decimal("-1"), Err(InvalidCharacter));
        assert_eq!(Amount::parse_decimal("+1"), Err(InvalidCharacter));
        assert_eq!(Amount::parse_decimal("1e3"), Err(InvalidCharacter));
        assert_eq!(Amount::parse_decimal(".5"), Err(InvalidCharacter));
        assert_eq!(Amount::parse_decimal("5."), Err(InvalidCharacter));
        assert_eq!(Amount::parse_decimal(" 5"), Err(InvalidCharacter));
        assert_eq!(Amount::parse_decimal("1.2.3"), Err(InvalidCharacter));
        assert_eq!(Amount::parse_decimal("0.0000001"), Err(TooManyDecimals));
        assert_eq!(Amount::parse_decimal("18446744073710"), Err(TooLarge));
        assert_eq!(
            Amount::parse_decimal("99999999999999999999999"),
            Err(TooLarge)
        );
    }

    #[test]
    fn amounts_render_in_canonical_decimal_form() {
        assert_eq!(Amount(2_500).to_string(), "0.0025");
        assert_eq!(Amount(1_000_000).to_string(), "1.00");
        assert_eq!(Amount(1_500_000).to_string(), "1.50");
        assert_eq!(Amount(1).to_string(), "0.000001");
        assert_eq!(Amount(123_456_789).to_string(), "123.456789");
    }

    #[test]
    fn fee_arithmetic_floors_and_never_overflows() {
        assert_eq!(Amount(2_500).mul_div_floor(290, 10_000), Some(Amount(72)));
        assert_eq!(Amount::MAX.mul_div_floor(10_000, 10_000), Some(Amount::MAX));
        assert_eq!(Amount::MAX.mul_div_floor(2, 1), None);
        assert_eq!(Amount(1).mul_div_floor(1, 0), None);
    }

    #[test]
    fn the_code_table_is_sorted_for_binary_search() {
        assert!(ISO_4217_CODES.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn only_known_iso_codes_are_currencies() {
        assert_eq!(Currency::parse("USD").unwrap().as_str(), "USD");
        assert!(Currency::parse("usd").is_none());
        assert!(Currency::parse("XXX").is_none());
        assert!(Currency::parse("US").is_none());
        let kes = Currency::parse("KES").unwrap();
        assert_eq!(Currency::from_u32(kes.to_u32()), Some(kes));
    }
}
