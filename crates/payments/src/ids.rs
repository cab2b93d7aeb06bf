//! Opaque, prefixed object ids (`pay_…`), parsed at the edge.

use std::fmt;

/// Crockford's base32 alphabet, lowercase: no `i`, `l`, `o` or `u` to misread.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Characters after the prefix: 26 base32 digits hold 128 bits.
const ID_DIGITS: usize = 26;

fn encode(value: u128) -> [u8; ID_DIGITS] {
    let mut out = [0u8; ID_DIGITS];
    let mut v = value;
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    out
}

/// Each byte's digit value, or `INVALID`.
const INVALID: u8 = 0xFF;
const DIGIT_OF: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut digit = 0;
    while digit < 32 {
        table[ALPHABET[digit] as usize] = digit as u8;
        digit += 1;
    }
    table
};

fn decode(text: &str) -> Option<u128> {
    if text.len() != ID_DIGITS {
        return None;
    }
    let mut value: u128 = 0;
    for (index, byte) in text.bytes().enumerate() {
        let digit = DIGIT_OF[usize::from(byte)];
        if digit == INVALID {
            return None;
        }
        let digit = u128::from(digit);
        // The first digit carries only 3 of 128 bits.
        if index == 0 && digit > 7 {
            return None;
        }
        value = (value << 5) | digit;
    }
    Some(value)
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        ///
        /// Kept as its high and low halves: aligned to 8 bytes rather than a `u128`'s 16, so
        /// that an enum or an `Option` holding one takes 24 bytes, not 32 (a cached payer's
        /// rows hold several). It orders and hashes as the `u128` it stands for.
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
        pub struct $name([u64; 2]);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn from_u128(value: u128) -> Self {
                Self([(value >> 64) as u64, value as u64])
            }

            pub fn to_u128(self) -> u128 {
                (u128::from(self.0[0]) << 64) | u128::from(self.0[1])
            }

            /// Parses `prefix_` followed by 26 base32 digits.
            pub fn parse(text: &str) -> Option<Self> {
                let rest = text.strip_prefix($prefix)?.strip_prefix('_')?;
                decode(rest).map(Self::from_u128)
            }
        }

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                state.write_u128(self.to_u128());
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let digits = encode(self.to_u128());
                f.write_str($prefix)?;
                f.write_str("_")?;
                f.write_str(std::str::from_utf8(&digits).expect("alphabet is ASCII"))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

prefixed_id!(
    /// A merchant: `mer_…`.
    MerchantId,
    "mer"
);
prefixed_id!(
    /// A payer: `pyr_…`.
    PayerId,
    "pyr"
);
prefixed_id!(
    /// A payment: `pay_…`.
    PaymentId,
    "pay"
);
prefixed_id!(
    /// A top-up of a payer's wallet: `top_…`.
    TopupId,
    "top"
);
prefixed_id!(
    /// A refund of a payment: `ref_…`.
    RefundId,
    "ref"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_as_the_numbers_they_stand_for_and_take_24_bytes_in_an_option() {
        let values = [
            0u128,
            1,
            u128::from(u64::MAX),
            u128::from(u64::MAX) + 1,
            u128::MAX,
        ];
        for a in values {
            assert_eq!(PaymentId::from_u128(a).to_u128(), a);
            for b in values {
                assert_eq!(
                    PaymentId::from_u128(a).cmp(&PaymentId::from_u128(b)),
                    a.cmp(&b)
                );
            }
        }
        assert_eq!(std::mem::size_of::<Option<PaymentId>>(), 24);
    }

    #[test]
    fn ids_round_trip_through_their_text_form() {
        for value in [0u128, 1, 42, u128::MAX, u128::MAX / 3] {
            let id = PaymentId::from_u128(value);
            let text = id.to_string();
            assert!(text.starts_with("pay_"));
            assert_eq!(text.len(), 4 + ID_DIGITS);
            assert_eq!(PaymentId::parse(&text), Some(id));
        }
    }

    #[test]
    fn ids_with_the_wrong_prefix_or_digits_do_not_parse() {
        let text = PayerId::from_u128(7).to_string();
        assert!(MerchantId::parse(&text).is_none());
        assert!(PayerId::parse("pyr_").is_none());
        assert!(PayerId::parse("pyr_zzzzzzzzzzzzzzzzzzzzzzzzzz").is_none());
        assert!(PayerId::parse("pyr_0000000000000000000000000u").is_none());
        assert!(PayerId::parse(&text.to_uppercase()).is_none());
    }
}
