use super::*;
use quiche::h3::NameValue;
use std::task::Waker;

fn stats() -> Arc<WorkerStats> {
    Arc::new(WorkerStats::default())
}

fn shape(expected: Option<u64>, limit: Option<u64>) -> RequestShape {
    RequestShape {
        expected,
        limit,
        body_follows: true,
    }
}

fn poll(task: &TaskEnd) -> Poll<RequestEvent> {
    task.poll_request(Waker::noop())
}

fn head(status: &str) -> Vec<Header> {
    vec![Header::new(b":status", status.as_bytes())]
}

#[test]
fn the_request_body_flows_to_the_task_and_ends_once() {
    let (lp, task) = new(shape(Some(5), None), stats(), None);
    assert!(poll(&task).is_pending());
    lp.push_request(Bytes::from_static(b"abc")).unwrap();
    lp.push_request(Bytes::from_static(b"de")).unwrap();
    assert!(matches!(poll(&task), Poll::Ready(RequestEvent::Data(d)) if d == "abc"));
    assert!(matches!(poll(&task), Poll::Ready(RequestEvent::Data(d)) if d == "de"));
    assert!(poll(&task).is_pending());
    lp.end_request(None).unwrap();
    assert!(matches!(poll(&task), Poll::Ready(RequestEvent::End(None))));
    // The end is delivered once; the stream's FIN afterwards changes nothing.
    assert!(poll(&task).is_pending());
    assert_eq!(lp.end_request(None), Ok(()));
    assert_eq!(task.request_bytes(), 5);
}

#[test]
fn trailers_end_the_body_and_cannot_come_twice() {
    let (lp, task) = new(shape(None, None), stats(), None);
    let mut t = http::HeaderMap::new();
    t.insert("x-t", http::HeaderValue::from_static("1"));
    lp.end_request(Some(t.clone())).unwrap();
    assert_eq!(lp.end_request(Some(t)), Err(BodyError::Ended));
    assert_eq!(
        lp.push_request(Bytes::from_static(b"late")),
        Err(BodyError::Ended)
    );
    assert!(matches!(
        poll(&task),
        Poll::Ready(RequestEvent::End(Some(_)))
    ));
}

#[test]
fn the_body_must_match_content_length() {
    let (lp, _task) = new(shape(Some(3), None), stats(), None);
    assert_eq!(
        lp.push_request(Bytes::from_static(b"abcd")),
        Err(BodyError::LengthMismatch)
    );
    lp.push_request(Bytes::from_static(b"ab")).unwrap();
    assert_eq!(lp.end_request(None), Err(BodyError::LengthMismatch));
}

#[test]
fn a_body_over_the_limit_turns_into_too_large() {
    let (lp, task) = new(shape(None, Some(4)), stats(), None);
    lp.push_request(Bytes::from_static(b"abc")).unwrap();
    assert_eq!(
        lp.push_request(Bytes::from_static(b"de")),
        Err(BodyError::TooLarge)
    );
    // TooLarge wins over queued data: the task answers 413 at once.
    assert!(matches!(poll(&task), Poll::Ready(RequestEvent::TooLarge)));
    assert_eq!(task.request_limit(), Some(4));
    assert_eq!(lp.end_request(None), Ok(()));
    assert!(lp.request_unfinished());
}

#[test]
fn the_loop_stops_reading_when_the_queue_is_full_and_is_woken_when_there_is_room() {
    let wakeup = Rc::new(Wakeup::default());
    let waker = ConnWaker::new(wakeup.clone(), (3, 7));
    let (lp, task) = new(shape(None, None), stats(), Some(waker));
    assert!(lp.room_for_request());
    lp.push_request(Bytes::from(vec![0; REQ_BUF_LIMIT]))
        .unwrap();
    assert!(!lp.room_for_request());
    assert!(!lp.wants_reading());
    assert!(wakeup.take().is_empty(), "nothing for the loop yet");
    let _ = poll(&task);
    assert!(lp.wants_reading());
    // The exchange itself woke the connection, once however often it was asked.
    assert_eq!(wakeup.take(), vec![(3, 7)]);
    assert!(wakeup.take().is_empty());
}

#[test]
fn every_task_change_wakes_the_connection_once_until_the_loop_looks() {
    let wakeup = Rc::new(Wakeup::default());
    let waker = ConnWaker::new(wakeup.clone(), (1, 2));
    let (lp, task) = new(shape(None, None), stats(), Some(waker));
    task.respond(head("200")).unwrap();
    task.push_body(Bytes::from_static(b"a")).unwrap();
    task.push_body(Bytes::from_static(b"b")).unwrap();
    assert_eq!(wakeup.take(), vec![(1, 2)], "one entry for three changes");
    task.finish(None).unwrap();
    assert_eq!(wakeup.take(), vec![(1, 2)]);
    drop(task);
    assert_eq!(wakeup.take(), vec![(1, 2)], "the task going away");
    assert!(matches!(lp.pending(), Pending::Head { fin: false }));
}

#[test]
fn a_task_that_panics_leaves_its_stream_reset_not_hanging() {
    let stats = stats();
    let wakeup = Rc::new(Wakeup::default());
    let waker = ConnWaker::new(wakeup.clone(), (5, 1));
    let (lp, task) = new(shape(None, None), stats.clone(), Some(waker));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let joined = local.block_on(&rt, async move {
        tokio::task::spawn_local(async move {
            let _task = task;
            // Whatever bug it is: the task unwinds holding its end of the exchange.
            panic!("a bug in the request task");
        })
        .await
    });
    assert!(joined.unwrap_err().is_panic());
    assert!(matches!(lp.pending(), Pending::Reset(H3_INTERNAL_ERROR)));
    assert!(lp.task_done());
    assert_eq!(wakeup.take(), vec![(5, 1)], "the loop is told");
    assert_eq!(stats.tasks_unfinished.load(Ordering::Relaxed), 1);
    // A task that answered and went away normally counts nothing.
    let (lp, task) = new(shape(None, None), stats.clone(), None);
    task.respond(head("200")).unwrap();
    task.finish(None).unwrap();
    drop(task);
    assert!(matches!(lp.pending(), Pending::Head { fin: true }));
    assert_eq!(stats.tasks_unfinished.load(Ordering::Relaxed), 1);
}

#[test]
fn a_request_without_body_goes_up_with_its_head() {
    let no_body = RequestShape {
        body_follows: false,
        ..RequestShape::default()
    };
    let (_lp, task) = new(no_body, stats(), None);
    assert!(task.request_is_empty());
    let (lp, task) = new(shape(None, None), stats(), None);
    assert!(!task.request_is_empty());
    lp.end_request(None).unwrap();
    assert!(task.request_is_empty());
}

#[test]
fn the_response_is_written_in_order_head_body_trailers() {
    let (lp, task) = new(shape(None, None), stats(), None);
    assert!(matches!(lp.pending(), Pending::Nothing));
    // Body and end before the head are refused and change nothing.
    assert!(task.push_body(Bytes::from_static(b"x")).is_err());
    assert!(task.finish(None).is_err());
    task.respond(head("200")).unwrap();
    assert!(task.respond(head("200")).is_err());
    assert_eq!(lp.head_fields().map(|h| h.len()), Some(1));
    task.push_body(Bytes::from_static(b"hello")).unwrap();
    assert!(matches!(lp.pending(), Pending::Head { fin: false, .. }));
    assert!(lp.body_written(1, false).is_err(), "body before the head");
    lp.head_written(false).unwrap();
    assert!(lp.head_written(false).is_err());
    let Pending::Body { chunk, fin: false } = lp.pending() else {
        panic!("expected a body chunk");
    };
    assert_eq!(chunk, "hello");
    assert!(lp.body_written(6, false).is_err(), "more than the chunk");
    lp.body_written(2, false).unwrap();
    assert!(matches!(lp.pending(), Pending::Body { chunk, .. } if chunk == "llo"));
    lp.body_written(3, false).unwrap();
    assert!(matches!(lp.pending(), Pending::Nothing));
    assert!(lp.end_written().is_err(), "end before the task finished");
    task.finish(Some(vec![Header::new(b"x-t", b"1")])).unwrap();
    assert!(task.push_body(Bytes::from_static(b"late")).is_err());
    assert!(matches!(lp.pending(), Pending::Trailers));
    assert_eq!(lp.trailer_fields().map(|t| t.len()), Some(1));
    lp.end_written().unwrap();
    assert!(!lp.complete(), "the task still runs");
    drop(task);
    assert!(lp.complete());
}

#[test]
fn the_last_chunk_carries_fin() {
    let (lp, task) = new(shape(None, None), stats(), None);
    task.respond(head("200")).unwrap();
    task.push_body(Bytes::from_static(b"ab")).unwrap();
    task.push_body(Bytes::from_static(b"cd")).unwrap();
    task.finish(None).unwrap();
    lp.head_written(false).unwrap();
    assert!(matches!(lp.pending(), Pending::Body { fin: false, .. }));
    lp.body_written(2, false).unwrap();
    assert!(matches!(lp.pending(), Pending::Body { fin: true, .. }));
    lp.body_written(2, true).unwrap();
    assert!(matches!(lp.pending(), Pending::Nothing));
    assert!(lp.end_written().is_err(), "already ended with the chunk");
}

#[test]
fn a_head_taken_is_handed_over_once_and_a_refused_take_changes_nothing() {
    let (lp, task) = new(shape(None, None), stats(), None);
    assert!(lp.take_head(false).is_err(), "no head yet");
    assert!(matches!(lp.pending(), Pending::Nothing));
    task.respond(head("204")).unwrap();
    task.finish(None).unwrap();
    assert!(matches!(lp.pending(), Pending::Head { fin: true, .. }));
    let fields = lp.take_head(true).unwrap();
    assert_eq!(fields.len(), 1);
    assert_eq!(fields[0].value(), b"204");
    assert!(lp.head_fields().is_none(), "taken, not copied");
    assert!(lp.take_head(true).is_err());
    assert!(lp.head_written(true).is_err());
    assert!(matches!(lp.pending(), Pending::Nothing));
    assert!(lp.end_written().is_err(), "ended with the head");
}

#[test]
fn a_local_answer_is_complete_at_once() {
    let lp = local(head("404"), Bytes::from_static(b"no route"), false, stats());
    assert!(matches!(lp.pending(), Pending::Head { fin: false, .. }));
    lp.head_written(false).unwrap();
    assert!(matches!(lp.pending(), Pending::Body { fin: true, .. }));
    lp.body_written(8, true).unwrap();
    assert!(lp.complete());
    let empty = local(head("200"), Bytes::new(), true, stats());
    assert!(matches!(empty.pending(), Pending::Head { fin: true, .. }));
    empty.head_written(true).unwrap();
    assert!(empty.complete());
    assert!(empty.request_unfinished(), "its body was never read");
}

#[test]
fn a_reset_replaces_whatever_was_queued() {
    let (lp, task) = new(shape(None, None), stats(), None);
    task.respond(head("200")).unwrap();
    task.push_body(Bytes::from_static(b"partial")).unwrap();
    task.reset(0x102).unwrap();
    assert!(matches!(lp.pending(), Pending::Reset(0x102)));
    assert!(task.finish(None).is_err());
    let (lp, task) = new(shape(None, None), stats(), None);
    task.respond(head("204")).unwrap();
    task.finish(None).unwrap();
    lp.head_written(true).unwrap();
    assert!(task.reset(0x102).is_err(), "nothing to reset once written");
}

#[test]
fn the_client_leaving_wakes_and_stops_the_task() {
    let (lp, task) = new(shape(None, None), stats(), None);
    lp.push_request(Bytes::from_static(b"queued")).unwrap();
    lp.abort();
    assert!(lp.client_gone());
    // What was queued is still delivered, then the abort.
    assert!(matches!(poll(&task), Poll::Ready(RequestEvent::Data(_))));
    assert!(matches!(poll(&task), Poll::Ready(RequestEvent::Aborted)));
    assert_eq!(
        task.poll_response_room(Waker::noop()),
        Poll::Ready(Err(ClientGone))
    );
}

#[test]
fn the_response_queue_is_bounded() {
    let (lp, task) = new(shape(None, None), stats(), None);
    task.respond(head("200")).unwrap();
    task.push_body(Bytes::from(vec![0; RESP_BUF_LIMIT]))
        .unwrap();
    assert!(task.poll_response_room(Waker::noop()).is_pending());
    lp.head_written(false).unwrap();
    lp.body_written(1, false).unwrap();
    assert_eq!(task.poll_response_room(Waker::noop()), Poll::Ready(Ok(())));
}

/// A client that takes nothing has at most `RESP_AHEAD` of its response waiting here; room
/// follows the credit it gives, up to `RESP_BUF_LIMIT`.
#[test]
fn the_response_queue_follows_the_clients_credit() {
    let (lp, task) = new(shape(None, None), stats(), None);
    task.respond(head("200")).unwrap();
    lp.head_written(false).unwrap();
    lp.set_client_room(0);
    task.push_body(Bytes::from(vec![0; RESP_AHEAD])).unwrap();
    assert!(task.poll_response_room(Waker::noop()).is_pending());
    // Credit for 1 KiB more: room again, and so on up to the limit whatever the credit.
    lp.set_client_room(1024);
    assert_eq!(task.poll_response_room(Waker::noop()), Poll::Ready(Ok(())));
    task.push_body(Bytes::from(vec![0; 1024])).unwrap();
    assert!(task.poll_response_room(Waker::noop()).is_pending());
    lp.set_client_room(usize::MAX);
    task.push_body(Bytes::from(vec![0; RESP_BUF_LIMIT - RESP_AHEAD - 1024]))
        .unwrap();
    assert!(task.poll_response_room(Waker::noop()).is_pending());
}

#[test]
fn live_exchanges_are_counted() {
    let s = stats();
    let (lp, task) = new(shape(None, None), s.clone(), None);
    assert_eq!(s.streams_active.load(Ordering::Relaxed), 1);
    drop(task);
    assert_eq!(s.streams_active.load(Ordering::Relaxed), 1);
    drop(lp);
    assert_eq!(s.streams_active.load(Ordering::Relaxed), 0);
}
