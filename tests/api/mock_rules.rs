//! The mock queue is strict where the platform is: a connection that stalls in its headers
//! is closed.

use std::time::Duration;

use runpod_worker::mock_queue::MockOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{client_with_key, spawn_mock_with, test_mock_options, EP, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_stalls_in_its_headers_is_closed_after_the_timeout() {
    let mock = spawn_mock_with(MockOptions {
        header_read_timeout: Duration::from_millis(300),
        ..test_mock_options()
    });
    let address = mock.base_url().trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    stalled
        .write_all(b"GET /v2/ep/health HTTP/1.1\r\nHost: x\r\nAuthoriz")
        .await
        .unwrap();
    // The server closes it (after at most an error response): the read ends.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, stalled.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the stalled connection is still open");
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("200 OK"), "{text}");

    // A request that sends its head at once is served as before.
    let answer = client_with_key()
        .get(format!("{}/v2/{EP}/health", mock.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}
