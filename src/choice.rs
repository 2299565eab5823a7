//! Named choices (`--compress zstd`, `--dirty-tracking uffd-wp`, ...): the
//! enums derive `clap::ValueEnum`, and [`value_enum_text!`] gives them
//! `Display` and `FromStr` from the same names, so the command line, the
//! reports and parsing share one list.

/// The names of every choice of `T`, comma-separated.
pub fn names<T: clap::ValueEnum>() -> String {
    T::value_variants()
        .iter()
        .filter_map(|v| v.to_possible_value())
        .map(|p| p.get_name().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `Display` and `FromStr` for a `clap::ValueEnum`; `$what` names the
/// choice in errors ("unknown compression method \"x\" (none, zlib, ...)").
#[macro_export]
macro_rules! value_enum_text {
    ($t:ty, $what:expr) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let v = clap::ValueEnum::to_possible_value(self).expect("no skipped variants");
                f.write_str(v.get_name())
            }
        }

        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <$t as clap::ValueEnum>::from_str(s, false).map_err(|_| {
                    format!(
                        "unknown {} {s:?} ({})",
                        $what,
                        $crate::choice::names::<$t>()
                    )
                })
            }
        }
    };
}
