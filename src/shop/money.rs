//! Exact money: a decimal with two places, never a float. It travels as a
//! string ("2399.00") and is stored as DECIMAL.

use std::fmt;

use rust_decimal::Decimal;

/// The most a stored amount may hold: 13 digits before the point
/// (DECIMAL(15,2)).
const MAX_TOTAL: Decimal = Decimal::from_parts(2_764_472_319, 232_830, 0, false, 2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Money(Decimal);

impl Money {
    /// From a stored value. SQLite hands decimals back through a float, so
    /// the value is rounded to its two places, which is exact for the
    /// 15 digits a DECIMAL(15,2) holds.
    pub fn from_db(value: Decimal) -> Self {
        let mut value = value.round_dp(2);
        value.rescale(2);
        Money(value)
    }

    /// Parses "2399.00" (or "2399", "2399.5"); at most two places, not
    /// negative.
    pub fn parse(text: &str) -> Result<Self, String> {
        let shown = crate::quote::quoted(text);
        let value: Decimal = text
            .trim()
            .parse()
            .map_err(|_| format!("{shown} is not a decimal amount"))?;
        if value.is_sign_negative() {
            return Err(format!("{shown} is negative"));
        }
        if value.scale() > 2 {
            return Err(format!("{shown} has more than two decimal places"));
        }
        if value > MAX_TOTAL {
            return Err(format!("{shown} is too large"));
        }
        Ok(Money::from_db(value))
    }

    /// `self × count`, or None when the result would not fit a stored
    /// amount.
    pub fn times(self, count: u32) -> Option<Money> {
        let total = self.0.checked_mul(Decimal::from(count))?;
        (total <= MAX_TOTAL).then(|| Money::from_db(total))
    }

    pub fn decimal(self) -> Decimal {
        self.0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_keep_two_places_and_multiply_exactly() {
        let price = Money::parse("2399").unwrap();
        assert_eq!(price.to_string(), "2399.00");
        assert_eq!(price.times(10).unwrap().to_string(), "23990.00");
        assert_eq!(
            Money::parse("0.10").unwrap().times(3).unwrap().to_string(),
            "0.30"
        );
        // What SQLite gives back for 19.99 stored as REAL.
        let from_float = Decimal::try_from(19.99_f64).unwrap();
        assert_eq!(Money::from_db(from_float).to_string(), "19.99");
        assert!(Money::parse("1.001").is_err());
        assert!(Money::parse("-1").is_err());
        assert!(Money::parse("abc").is_err());
        let large = Money::parse("99999999.99").unwrap();
        assert_eq!(large.times(1000).unwrap().to_string(), "99999999990.00");
        assert!(large.times(1_000_000).is_none());
    }

    #[test]
    fn the_largest_amount_is_thirteen_digits() {
        assert_eq!(MAX_TOTAL.to_string(), "9999999999999.99");
    }
}
