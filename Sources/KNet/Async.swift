#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// listenAndServe and dialAndServe block their thread for the life of the server or
// client. Called inside a Task they would hold one of the task pool's few threads (one
// per core) for good, and two of them starve every other task of a 2-core machine. The
// async forms run the blocking call on a thread of its own and suspend meanwhile.

extension TCPServer {
    /// Async `listenAndServe`: serves on a new thread of its own (no thread of Swift's task
    /// pool is held) and suspends until it ends, throwing what `listenAndServe` throws.
    /// Cancelling the task closes the server (`close()`), so it throws `.serverClosed`.
    /// Callbacks run on loop threads, as always.
    public func run(handler: (any TCPHandler)? = nil, codec: (any Codec)? = nil) async throws {
        try await serveCancellably(closed: .serverClosed, close: close) {
            try self.listenAndServe(handler: handler, codec: codec)
        }
    }
}

extension TCPClient {
    /// Async `dialAndServe`: dials and serves on a new thread of its own (no thread of
    /// Swift's task pool is held) and suspends until it ends, throwing what `dialAndServe`
    /// throws. Cancelling the task closes the client (`close()`), so it throws
    /// `.clientClosed`. Callbacks run on loop threads, as always.
    public func run(handler: (any TCPHandler)? = nil, codec: (any Codec)? = nil) async throws {
        try await serveCancellably(closed: .clientClosed, close: close) {
            try self.dialAndServe(handler: handler, codec: codec)
        }
    }
}

/// Runs the blocking `serve` on a thread of its own; the task's cancellation calls `close`.
/// `serve` failing as the task was cancelled (a failed listen or dial racing it) throws
/// `closed`, as cancellation promises, after a `close` of its own (harmless twice: it
/// covers a cancellation handler that did not run).
private func serveCancellably(closed: KNetError, close: @escaping @Sendable () -> Void,
                              _ serve: @escaping @Sendable () throws -> Void) async throws {
    try await withTaskCancellationHandler {
        do {
            try await onOwnThread(serve)
        } catch where Task.isCancelled {
            close()
            throw closed
        }
    } onCancel: {
        close()
    }
}

/// The work a thread started by `onOwnThread` runs (owned by that thread once started).
private final class ThreadWork: Sendable {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

/// Runs `body` on a new detached thread and suspends until it returns or throws; throws
/// `.system(errno:)` (EAGAIN...) when no thread can be made.
private func onOwnThread(_ body: @escaping @Sendable () throws -> Void) async throws {
    try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, any Error>) in
        let work = Unmanaged.passRetained(ThreadWork { done.resume(with: Result { try body() }) })
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        pthread_attr_setdetachstate(&attr, Int32(PTHREAD_CREATE_DETACHED))
        #if canImport(Darwin)
        var thread: pthread_t?
        #else
        var thread = pthread_t()
        #endif
        let rc = pthread_create(&thread, &attr, { arg in
            Unmanaged<ThreadWork>.fromOpaque(arg!).takeRetainedValue().body()
            return nil
        }, work.toOpaque())
        pthread_attr_destroy(&attr)
        if rc != 0 {
            work.release()
            done.resume(throwing: KNetError.system(errno: rc))
        }
    }
}
