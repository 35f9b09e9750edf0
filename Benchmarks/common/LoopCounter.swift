// The client counters of the Swift contenders (knet's Swift API and SwiftNIO): one file,
// linked into both targets, so both count the same way. The C contenders count per loop
// in the same spirit (see Benchmarks/README.md).
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// Counters of one loop thread: a read touches its own thread's counters, not a cold
/// line per connection. Only that thread writes them (relaxed load + store, no
/// read-modify-write); the main thread reads them at the start and the end of the count.
final class LoopCounter: Sendable {
    let bytes = Atomic<Int>(0)
    let messages = Atomic<Int>(0)
    // Keeps two threads' counters off one cache line.
    private let padding: (Int, Int, Int, Int, Int, Int, Int, Int) = (0, 0, 0, 0, 0, 0, 0, 0)

    /// Every thread's counter, for the totals.
    static let all = Mutex<[LoopCounter]>([])

    /// The calling thread's counter, created and registered on first use.
    static var current: Unmanaged<LoopCounter> {
        if let raw = pthread_getspecific(loopCounterKey) { return Unmanaged.fromOpaque(raw) }
        let counter = LoopCounter()
        all.withLock { $0.append(counter) } // keeps it alive for good
        let unmanaged = Unmanaged.passUnretained(counter)
        pthread_setspecific(loopCounterKey, unmanaged.toOpaque())
        return unmanaged
    }

    /// Adds one read of `count` bytes to the calling thread's counters.
    static func add(_ count: Int) {
        current._withUnsafeGuaranteedRef { counter in
            counter.bytes.store(counter.bytes.load(ordering: .relaxed) &+ count, ordering: .relaxed)
            counter.messages.store(counter.messages.load(ordering: .relaxed) &+ 1, ordering: .relaxed)
        }
    }

    /// Bytes and messages counted so far by every thread.
    static func totals() -> (bytes: Int, messages: Int) {
        all.withLock { counters in
            counters.reduce((0, 0)) {
                ($0.0 + $1.bytes.load(ordering: .relaxed), $0.1 + $1.messages.load(ordering: .relaxed))
            }
        }
    }
}

private let loopCounterKey: pthread_key_t = {
    var key = pthread_key_t()
    precondition(pthread_key_create(&key, nil) == 0, "pthread_key_create failed")
    return key
}()
