//! MariaDB → PostgreSQL against real sandbox servers: every row of the type
//! mapping, with extreme values, lands as the documented PostgreSQL value.

use std::process::Command;

use cutover::sandbox::{MariaDbServer, PostgresServer};
use mysql_async::prelude::Queryable;

const SOURCE_SQL: &str = r#"
SET SESSION sql_mode = '', time_zone = '+00:00';
CREATE DATABASE shop CHARACTER SET utf8mb4;
USE shop;
CREATE TABLE every_type (
  id int unsigned NOT NULL AUTO_INCREMENT PRIMARY KEY,
  flag tinyint(1), tiny tinyint, utiny tinyint unsigned, small smallint, usmall smallint unsigned,
  medium mediumint, umedium mediumint unsigned, regular int, uint int unsigned, big bigint,
  ubig bigint unsigned, money decimal(30,10), f float, d double, c char(5), vc varchar(20),
  t text, lt longtext, bin binary(4), vb varbinary(10), bl blob, dt date, dtm datetime(6),
  ts timestamp(6) NULL DEFAULT NULL, tm time(3), yr year, mood enum('sad','ok','it''s fine'),
  tags set('a','b','c'), doc json, bits bit(12), g geometry,
  latin varchar(10) CHARACTER SET latin1,
  UNIQUE KEY vc_unique (vc), KEY by_big (big, small)
);
INSERT INTO every_type VALUES
 (NULL, 1, -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295, -9223372036854775808,
  18446744073709551615, -12345678901234567890.0123456789, 3.14159, 2.718281828459045, 'ab', 'emoji 🦀',
  'tab\there\nnewline \\ backslash', REPEAT('x', 70000), 0x00FF0102, 0xDEADBEEF, 0x00, '2024-02-29',
  '1999-12-31 23:59:59.123456', '2024-02-29 23:59:59.654321', '-838:59:59.000', 2024, 'it''s fine',
  'a,c', '{"k": [1, "two", null]}', b'101010111100', ST_GeomFromText('POINT(1 2)'), 'Zürich'),
 (NULL, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, '', '', '', '', 0x00000000, '', '', '0000-00-00',
  '0000-00-00 00:00:00', NULL, '838:59:59.999', 1901, 'sad', '', '[]', b'0', NULL, ''),
 (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
CREATE TABLE no_key (a int, b varchar(10));
INSERT INTO no_key VALUES (1, 'one'), (1, 'one'), (2, NULL);
CREATE TABLE big_one (id bigint PRIMARY KEY, payload varchar(100));
INSERT INTO big_one SELECT seq, CONCAT('row ', seq) FROM seq_1_to_250000;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_copy_maps_every_type() {
    let source = MariaDbServer::start(&[]).expect("mariadb");
    let target = PostgresServer::start(&[]).expect("postgres");
    let mut conn = mysql_async::Conn::new(mysql_async::Opts::from_url(&source.url("mysql")).expect("url"))
        .await
        .expect("connects to mariadb");
    conn.query_drop(SOURCE_SQL).await.expect("source data");
    drop(conn);

    let dir = std::env::temp_dir().join(format!("cutover-test-mysql-{}", source.port()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("mysql-to-pg.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"mysql\"\nurl = \"{}\"\n[target]\nkind = \"postgres\"\nurl = \"{}\"\n[state]\ndir = \"{}\"\n[snapshot]\nmode = \"only\"\nworkers = 2\n",
            source.url("shop"),
            target.url("postgres"),
            dir.join("state").display()
        ),
    )
    .expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_cutover")).args(["run", "--config"]).arg(&config).output().expect("runs");
    let log = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "cutover failed:\n{log}");

    let (client, connection) = tokio_postgres::connect(&target.url("postgres"), tokio_postgres::NoTls).await.expect("pg");
    tokio::spawn(connection);
    client.batch_execute("SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'").await.expect("session");
    let rows = client
        .query(
            "SELECT concat_ws('|', flag, tiny, utiny, small, usmall, medium, umedium, regular, uint, big, ubig, money, f, d,
                     c, vc, t, length(lt), encode(bin, 'hex'), encode(vb, 'hex'), encode(bl, 'hex'), dt, dtm, ts, tm, yr,
                     mood, tags, doc, bits, length(g), latin)
             FROM shop.every_type ORDER BY id",
            &[],
        )
        .await
        .expect("query");
    let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        got,
        vec![
            "t|-128|255|-32768|65535|-8388608|16777215|-2147483648|4294967295|-9223372036854775808|18446744073709551615|\
             -12345678901234567890.0123456789|3.14159|2.718281828459045|ab|emoji 🦀|tab\there\nnewline \\ backslash|70000|\
             00ff0102|deadbeef|00|2024-02-29|1999-12-31 23:59:59.123456|2024-02-29 23:59:59.654321+00|-838:59:59|2024|\
             it's fine|{a,c}|{\"k\": [1, \"two\", null]}|101010111100|25|Zürich"
                .to_string(),
            "f|0|0|0|0|0|0|0|0|0|0|0.0000000000|0|0||||0|00000000|||838:59:59.999|1901|sad|{}|[]|000000000000|".to_string(),
            String::new(),
        ]
    );
    // Zero dates became NULL; keys, unique constraints, indexes and the identity came along.
    let checks = [
        ("SELECT count(*) FROM shop.every_type WHERE dt IS NULL AND dtm IS NULL", 2i64),
        ("SELECT count(*) FROM shop.no_key", 3),
        ("SELECT count(*) FROM shop.big_one", 250_000),
        ("SELECT count(*) FROM pg_indexes WHERE schemaname = 'shop' AND indexname IN ('every_type_pkey', 'every_type_vc_unique', 'every_type_by_big', 'big_one_pkey')", 4),
        ("SELECT nextval(pg_get_serial_sequence('shop.every_type', 'id'))", 4),
        ("SELECT count(*) FROM pg_type WHERE typname = 'every_type_mood' AND typtype = 'e'", 1),
    ];
    for (sql, expected) in checks {
        let got: i64 = client.query_one(sql, &[]).await.expect(sql).get(0);
        assert_eq!(got, expected, "{sql}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
