//! Real clusters: started, queried with sqlx, stopped, started again, and gone after drop.

use std::time::{Duration, Instant};

use sqlx::Connection;

use super::*;

/// Waits up to 10 s for `cond`.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Running, or about to: a zombie (exited, not yet reaped by its parent) is not.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) state ...`; comm may hold spaces and parentheses, the state follows the last `)`.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

#[tokio::test]
async fn a_cluster_serves_queries_keeps_its_data_and_port_across_a_restart_and_leaves_nothing_behind() {
    let cluster = Cluster::start();
    let url = cluster.fresh_database();
    assert_eq!(url, format!("postgres://postgres@127.0.0.1:{}/db1", cluster.port()));
    assert_ne!(cluster.fresh_database(), url, "each fresh database is another one");

    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.unwrap();
    assert_eq!(one, 1);
    for (setting, want) in [("listen_addresses", "127.0.0.1"), ("fsync", "off"), ("max_connections", "200"), ("server_encoding", "UTF8")] {
        let got: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {setting}"))).fetch_one(&pool).await.unwrap();
        assert_eq!(got, want, "{setting}");
    }
    sqlx::query("CREATE TABLE kept (v TEXT NOT NULL)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO kept VALUES ('written before the stop')").execute(&pool).await.unwrap();
    pool.close().await;

    let first = cluster.pid().unwrap();
    assert!(cluster.processes().contains(&first));
    cluster.stop();
    assert!(sqlx::PgConnection::connect(&url).await.is_err(), "a stopped cluster takes no connection");
    assert!(cluster.processes().is_empty(), "pg_ctl stop waits for every process");
    assert!(!alive(first));

    cluster.start_again();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let kept: String = sqlx::query_scalar("SELECT v FROM kept").fetch_one(&mut conn).await.unwrap();
    assert_eq!(kept, "written before the stop");
    drop(conn);

    cluster.restart();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await.unwrap();
    assert_eq!(one, 1);
    assert!(cluster.log().contains("database system is ready to accept connections"), "{}", cluster.log());

    let (data, pid, processes) = (cluster.data_dir().to_owned(), cluster.pid().unwrap(), cluster.processes());
    assert!(processes.len() > 1, "a postmaster and its children: {processes:?}");
    drop(cluster);
    eventually("no process of the dropped cluster is left", || postgres_processes(&data).is_empty());
    assert!(processes.iter().all(|p| !alive(*p)), "{processes:?}");
    assert!(!alive(pid));
    assert!(!data.exists(), "the directory is removed");
    // The connection held across the drop is dead, not answered by anything else.
    assert!(sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut conn).await.is_err());
}

#[test]
fn a_test_that_panics_still_stops_its_cluster() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let cluster = Cluster::start();
        tx.send((cluster.data_dir().to_owned(), cluster.pid())).unwrap();
        panic!("the test fails while its cluster runs");
    })
    .join();
    assert!(outcome.is_err());
    let (data, pid) = rx.recv().unwrap();
    let pid = pid.unwrap();
    eventually("the panicking test's cluster is stopped", || postgres_processes(&data).is_empty() && !alive(pid));
}

#[tokio::test]
async fn a_port_taken_before_the_server_binds_it_is_given_up_for_another() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let mut ports = vec![busy];
    let cluster = Cluster::start_with(|| ports.pop().unwrap_or_else(free_port));
    assert_ne!(cluster.port(), busy);
    assert!(cluster.log().contains("Address already in use"), "{}", cluster.log());
    let mut conn = sqlx::PgConnection::connect(&cluster.fresh_database()).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await.unwrap();
    assert_eq!(one, 1);
    drop(taken);
}
