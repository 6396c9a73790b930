//! SQL text for the sink's statements. Every identifier is quoted; every value travels as a
//! bound parameter: one `text[]` array per column, turned into rows by `UNNEST` and cast to
//! the column's type. The statement text depends only on the columns, never on the number of
//! rows, so the server prepares it once per table shape.

use serde_json::Value;

use crate::schema::Columns;

/// `"name"`, with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The text a value is bound as for a column of `sql_type`. JSON columns take the value's JSON
/// text (a string keeps its quotes); other columns take a string as is and anything else as
/// its JSON text, for the server's input function (`42`, `36.6`, `true`). JSON null is SQL NULL.
pub fn param(value: &Value, sql_type: &str) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) if !is_json(sql_type) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

/// As [`param`], taking the value: a string for a non-JSON column is moved, not copied.
pub fn param_owned(value: Value, json: bool) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) if !json => Some(text),
        other => Some(other.to_string()),
    }
}

pub fn is_json(sql_type: &str) -> bool {
    sql_type == "jsonb" || sql_type == "json"
}

/// What an `INSERT` does with a row whose key is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// Nothing said: the key's unique constraint refuses the row.
    Refuse,
    Ignore,
    Update,
}

/// `UNNEST($1::text[], ...) AS u(c0, ...)` and the cast of each column, in order.
fn unnest(columns: &[&str], types: &Columns) -> (String, Vec<String>) {
    let arrays: Vec<String> = (1..=columns.len())
        .map(|n| format!("${n}::text[]"))
        .collect();
    let aliases: Vec<String> = (0..columns.len()).map(|n| format!("c{n}")).collect();
    let casts = columns
        .iter()
        .enumerate()
        .map(|(n, column)| {
            let ty = types.sql_type(column).unwrap_or("text");
            format!("CAST(u.c{n} AS {ty})")
        })
        .collect();
    (
        format!("UNNEST({}) AS u({})", arrays.join(", "), aliases.join(", ")),
        casts,
    )
}

fn quoted_list(columns: &[&str]) -> String {
    columns
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `INSERT` of the key columns then the other columns.
pub fn insert(
    table: &str,
    key: &[&str],
    others: &[&str],
    types: &Columns,
    on_conflict: OnConflict,
) -> String {
    let all: Vec<&str> = key.iter().chain(others).copied().collect();
    let (from, casts) = unnest(&all, types);
    let mut sql = format!(
        "INSERT INTO {} ({}) SELECT {} FROM {}",
        quote_ident(table),
        quoted_list(&all),
        casts.join(", "),
        from
    );
    match on_conflict {
        _ if key.is_empty() => {}
        OnConflict::Refuse => {}
        OnConflict::Update if !others.is_empty() => {
            let sets: Vec<String> = others
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                .collect();
            sql.push_str(&format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                quoted_list(key),
                sets.join(", ")
            ));
        }
        OnConflict::Update | OnConflict::Ignore => {
            sql.push_str(&format!(" ON CONFLICT ({}) DO NOTHING", quoted_list(key)));
        }
    }
    sql
}

fn key_match(key: &[&str], casts: &[String]) -> String {
    key.iter()
        .zip(casts)
        .map(|(column, cast)| format!("target.{} = {cast}", quote_ident(column)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `UPDATE` of the other columns of the rows with these keys; `None` when there is nothing to
/// set.
pub fn update(table: &str, key: &[&str], others: &[&str], types: &Columns) -> Option<String> {
    if others.is_empty() {
        return None;
    }
    let all: Vec<&str> = key.iter().chain(others).copied().collect();
    let (from, casts) = unnest(&all, types);
    let sets: Vec<String> = others
        .iter()
        .zip(casts.get(key.len()..).unwrap_or_default())
        .map(|(column, cast)| format!("{} = {cast}", quote_ident(column)))
        .collect();
    Some(format!(
        "UPDATE {} AS target SET {} FROM {} WHERE {}",
        quote_ident(table),
        sets.join(", "),
        from,
        key_match(key, casts.get(..key.len()).unwrap_or_default())
    ))
}

/// `DELETE` of the rows with these keys.
pub fn delete(table: &str, key: &[&str], types: &Columns) -> String {
    let (from, casts) = unnest(key, types);
    format!(
        "DELETE FROM {} AS target USING {} WHERE {}",
        quote_ident(table),
        from,
        key_match(key, &casts)
    )
}

/// `COPY ... FROM STDIN` (text format) into these columns: for plain inserts, the fastest way
/// in.
pub fn copy(table: &str, columns: &[&str]) -> String {
    format!(
        "COPY {} ({}) FROM STDIN",
        quote_ident(table),
        quoted_list(columns)
    )
}

/// Rows of COPY's text format from column-major values: tab-separated, `\N` for NULL,
/// backslash, tab, newline and carriage return escaped.
pub fn copy_rows(columns: &[Vec<Option<String>>], rows: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * columns.len() * 12);
    for row in 0..rows {
        for (n, column) in columns.iter().enumerate() {
            if n > 0 {
                out.push(b'\t');
            }
            match column.get(row).and_then(Option::as_deref) {
                None => out.extend_from_slice(b"\\N"),
                // Most values need no escape: copied whole.
                Some(text)
                    if !text
                        .bytes()
                        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
                {
                    out.extend_from_slice(text.as_bytes())
                }
                Some(text) => {
                    for byte in text.bytes() {
                        match byte {
                            b'\\' => out.extend_from_slice(b"\\\\"),
                            b'\t' => out.extend_from_slice(b"\\t"),
                            b'\n' => out.extend_from_slice(b"\\n"),
                            b'\r' => out.extend_from_slice(b"\\r"),
                            other => out.push(other),
                        }
                    }
                }
            }
        }
        out.push(b'\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn types() -> Columns {
        Columns::from_iter([
            ("id".to_string(), "bigint".to_string()),
            ("name".to_string(), "text".to_string()),
            ("obs".to_string(), "jsonb".to_string()),
        ])
    }

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("Vitals"), "\"Vitals\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("hl7.adt"), "\"hl7.adt\"");
    }

    #[test]
    fn values_are_bound_as_text_for_the_column_type() {
        assert_eq!(param(&json!("x"), "text").as_deref(), Some("x"));
        assert_eq!(param(&json!("x"), "jsonb").as_deref(), Some("\"x\""));
        assert_eq!(param(&json!(42), "bigint").as_deref(), Some("42"));
        assert_eq!(param(&json!(true), "boolean").as_deref(), Some("true"));
        assert_eq!(
            param(&json!({"a": 1}), "jsonb").as_deref(),
            Some("{\"a\":1}")
        );
        assert_eq!(param(&json!(null), "jsonb"), None);
    }

    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        let columns = vec![
            vec![Some("a\tb\\c\nd\re".to_string()), None],
            vec![Some(String::new()), Some("42".to_string())],
        ];
        assert_eq!(
            String::from_utf8(copy_rows(&columns, 2)).expect("UTF-8"),
            "a\\tb\\\\c\\nd\\re\t\n\\N\t42\n"
        );
        assert_eq!(
            copy("t", &["a", "b"]),
            "COPY \"t\" (\"a\", \"b\") FROM STDIN"
        );
    }

    #[test]
    fn statements_cast_unnested_arrays() {
        let upsert = insert("p", &["id"], &["name", "obs"], &types(), OnConflict::Update);
        assert_eq!(
            upsert,
            "INSERT INTO \"p\" (\"id\", \"name\", \"obs\") SELECT CAST(u.c0 AS bigint), CAST(u.c1 AS text), CAST(u.c2 AS jsonb) \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(c0, c1, c2) \
             ON CONFLICT (\"id\") DO UPDATE SET \"name\" = EXCLUDED.\"name\", \"obs\" = EXCLUDED.\"obs\""
        );
        let only_key = insert("p", &["id"], &[], &types(), OnConflict::Update);
        assert!(
            only_key.ends_with("ON CONFLICT (\"id\") DO NOTHING"),
            "{only_key}"
        );
        let plain = insert("p", &[], &["name"], &types(), OnConflict::Update);
        assert!(!plain.contains("ON CONFLICT"), "{plain}");
        assert_eq!(
            delete("p", &["id"], &types()),
            "DELETE FROM \"p\" AS target USING UNNEST($1::text[]) AS u(c0) WHERE target.\"id\" = CAST(u.c0 AS bigint)"
        );
        assert_eq!(
            update("p", &["id"], &["name"], &types()).as_deref(),
            Some(
                "UPDATE \"p\" AS target SET \"name\" = CAST(u.c1 AS text) FROM UNNEST($1::text[], $2::text[]) AS u(c0, c1) WHERE target.\"id\" = CAST(u.c0 AS bigint)"
            )
        );
        assert_eq!(update("p", &["id"], &[], &types()), None);
    }
}
