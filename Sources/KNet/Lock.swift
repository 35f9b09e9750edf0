#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// A pthread mutex rather than Synchronization.Mutex: on Linux the latter is built on raw
// futex calls that ThreadSanitizer does not see, so every access it guards would be
// reported as a race in `swift test --sanitize=thread` (of this package and its users).

/// A heap-allocated pthread mutex (its address must not move).
struct PThreadMutex: @unchecked Sendable {
    // A pthread mutex is made to be shared between threads.
    let pointer: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        pointer = .allocate(capacity: 1)
        pointer.initialize(to: pthread_mutex_t())
        let rc = pthread_mutex_init(pointer, nil)
        precondition(rc == 0, "pthread_mutex_init failed")
    }

    /// Destroys and frees the mutex; call once, when nothing can use it any more.
    func destroy() {
        pthread_mutex_destroy(pointer)
        pointer.deinitialize(count: 1)
        pointer.deallocate()
    }

    func withLock<Result>(_ body: () throws -> Result) rethrows -> Result {
        pthread_mutex_lock(pointer)
        defer { pthread_mutex_unlock(pointer) }
        return try body()
    }
}

/// A value guarded by a pthread mutex.
final class LockedValue<Value: Sendable>: @unchecked Sendable {
    // `value` is only touched with `mutex` held.
    private let mutex = PThreadMutex()
    private var value: Value

    init(_ value: Value) {
        self.value = value
    }

    deinit {
        mutex.destroy()
    }

    func withLock<Result>(_ body: (inout Value) throws -> Result) rethrows -> Result {
        try mutex.withLock { try body(&value) }
    }
}
