#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KNet
import Testing

// TCPServer.run / TCPClient.run cancelled at every moment of their life: the outcome is
// the documented one, nothing hangs, every connect(true) has its connect(false) before run
// returns, and no thread is left behind.

/// A listener on 127.0.0.1 whose accept queue (backlog 0) is full: one connection waits
/// in it, unaccepted, and the kernel drops every further SYN, so a dial to it hangs.
final class FullListener {
    let port: Int
    private let fd: Int32
    private let filler: PlainSocket

    init() throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw KNetError.system(errno: errno) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let fd = fd
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && listen(fd, 0) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard rc else {
            let error = errno
            Glibc.close(fd)
            throw KNetError.system(errno: error)
        }
        port = Int(UInt16(bigEndian: address.sin_port))
        filler = try PlainSocket(port: port)
    }

    deinit { Glibc.close(fd) }
}

/// The threads of this process now.
func threadCount() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? -1
}

extension KNetTests {
    @Test("run() cancelled at assorted moments of a server's start: always .serverClosed, at once")
    func runServerCancelledWhileStarting() async throws {
        for round in 0..<40 {
            let server = TCPServer("127.0.0.1:0")
            let handler = AwaitableHandler()
            let serving = outcome { try await server.run(handler: handler) }
            // 0...~40 yields: before the thread starts, while it resolves and listens, after.
            for _ in 0..<round { await Task.yield() }
            serving.cancel()
            #expect(await serving.value == .serverClosed, "round \(round)")
            #expect(handler.downs.withLock { $0 } == handler.conns.withLock { $0.count })
            // A closed server stays closed: waitUntilListening reports it (or the port).
            do {
                _ = try await offPool { try server.waitUntilListening(timeout: .seconds(1)) }
            } catch {
                #expect(error as? KNetError == .serverClosed)
            }
        }
    }

    @Test("run() cancelled while a client dials a peer that never answers the SYN: .clientClosed at once")
    func runClientCancelledWhileDialing() async throws {
        let full = try FullListener()
        let client = TCPClient("127.0.0.1:\(full.port)")
        let handler = AwaitableHandler()
        let started = ContinuousClock.now
        let dialing = outcome { try await client.run(handler: handler) }
        try await Task.sleep(for: .milliseconds(50)) // let the dial begin (any moment is correct)
        dialing.cancel()
        #expect(await dialing.value == .clientClosed)
        #expect(ContinuousClock.now - started < .seconds(5))
        #expect(handler.conns.withLock { $0.count } == 0)
    }

    @Test("run() with retry on against a refused port, cancelled at assorted moments (dial, 30 s backoff): .clientClosed at once")
    func runClientCancelledInBackoff() async throws {
        let reserved = try ReservedPort()
        for round in 0..<12 {
            let client = TCPClient("127.0.0.1:\(reserved.port)")
            client.enableRetry()
            client.setRetryBackoff(initial: .seconds(30), max: .seconds(60))
            let started = ContinuousClock.now
            let dialing = outcome { try await client.run() }
            if round > 0 { try await Task.sleep(for: .milliseconds(round * round)) }
            dialing.cancel()
            dialing.cancel() // twice: harmless
            #expect(await dialing.value == .clientClosed, "round \(round)")
            #expect(ContinuousClock.now - started < .seconds(10))
        }
    }

    @Test("run() cancelled while a client re-dials a server that closes every connection: .clientClosed, every connect(true) paired")
    func runClientCancelledBetweenRedials() async throws {
        let server = TCPServer("127.0.0.1:0")
        let serverHandler = AwaitableHandler()
        let closer = CloseOnConnect()
        let serving = outcome { try await server.run(handler: closer) }
        let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
        for round in 0..<10 {
            let client = TCPClient("127.0.0.1:\(port)")
            let handler = AwaitableHandler()
            let dialing = outcome { try await client.run(handler: handler) }
            #expect(await handler.until { $0.downs.withLock { $0 } >= round + 1 })
            dialing.cancel()
            #expect(await dialing.value == .clientClosed, "round \(round)")
            #expect(handler.downs.withLock { $0 } == handler.conns.withLock { $0.count })
            #expect(client.connection == nil)
        }
        _ = serverHandler
        serving.cancel()
        #expect(await serving.value == .serverClosed)
    }

    @Test("cancelling run() from a client handler's connect(true) (a loop thread): .clientClosed after its connect(false)")
    func runClientCancelledFromCallback() async throws {
        let silent = try SilentListener()
        let client = TCPClient("127.0.0.1:\(silent.port)")
        let task = Locked<Task<KNetError?, Never>?>(nil)
        let handler = CancelOnConnect(task: task)
        let gate = Locked(false)
        let dialing = outcome {
            // The task is published before run can connect.
            while !gate.withLock({ $0 }) { await Task.yield() }
            try await client.run(handler: handler)
        }
        task.withLock { $0 = dialing }
        gate.withLock { $0 = true }
        #expect(await dialing.value == .clientClosed)
        #expect(handler.ups.withLock { $0 } == 1)
        #expect(handler.downs.withLock { $0 } == 1)
    }

    @Test("a task cancelled after run() returned closes nothing: the object serves again")
    func runCancelledAfterReturnClosesNothing() async throws {
        let reserved = try ReservedPort()
        let client = TCPClient("127.0.0.1:\(reserved.port)")
        let first = outcome { try await client.run() }
        #expect(await first.value == .system(errno: ECONNREFUSED))
        first.cancel()
        #expect(await outcome { try await client.run() }.value == .system(errno: ECONNREFUSED))

        let server = TCPServer("no port")
        let failed = outcome { try await server.run() }
        #expect(await failed.value == .invalidAddress)
        failed.cancel()
        #expect(await outcome { try await server.run() }.value == .invalidAddress)
    }

    @Test("many cancelled runs leave no thread behind")
    func runLeavesNoThread() async throws {
        // Warm up: the loop threads and the pool's threads exist from here on.
        let warm = TCPServer("127.0.0.1:0")
        let warming = outcome { try await warm.run() }
        _ = try await offPool { try warm.waitUntilListening(timeout: .seconds(10)) }
        warming.cancel()
        #expect(await warming.value == .serverClosed)
        let before = threadCount()
        for _ in 0..<30 {
            let server = TCPServer("127.0.0.1:0")
            let serving = outcome { try await server.run() }
            let port = try await offPool { try server.waitUntilListening(timeout: .seconds(10)) }
            let client = TCPClient("127.0.0.1:\(port)")
            let handler = AwaitableHandler()
            let dialing = outcome { try await client.run(handler: handler) }
            #expect(await handler.until { $0.conns.withLock { $0.count } == 1 })
            dialing.cancel()
            serving.cancel()
            #expect(await dialing.value == .clientClosed)
            #expect(await serving.value == .serverClosed)
        }
        // offPool's Foundation threads and run's threads end just after they resume; the
        // task pool may have grown by its width meanwhile (60 leaked threads would show).
        let slack = ProcessInfo.processInfo.activeProcessorCount
        #expect(await eventuallyAsync { threadCount() <= before + slack }, "threads: \(before) before, \(threadCount()) after")
    }
}

/// Closes every connection as it comes up.
final class CloseOnConnect: TCPHandler {
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected { conn.close() }
    }
}

/// Cancels the task awaiting the client's run from its connect(true).
final class CancelOnConnect: TCPHandler {
    let task: Locked<Task<KNetError?, Never>?>
    let ups = Locked(0)
    let downs = Locked(0)
    init(task: Locked<Task<KNetError?, Never>?>) { self.task = task }
    func connect(_ conn: TCPConnection, connected: Bool) {
        if connected {
            ups.withLock { $0 += 1 }
            task.withLock { $0 }?.cancel()
        } else {
            downs.withLock { $0 += 1 }
        }
    }
}

/// A task executor that runs a job only once the test lets it (`release`), on a thread of
/// its own: a test can hold a task that run() has resumed while it is still suspended.
final class GatedExecutor: TaskExecutor, @unchecked Sendable {
    // `queued`, `released` and `stopped` are only touched with `condition` locked.
    private let condition = NSCondition()
    private var queued: [UnownedJob] = []
    private var released = 0
    private var stopped = false
    let enqueued = Locked(0)
    /// Jobs that have run to their end (the task suspended or finished).
    let ran = Locked(0)

    init() {
        Thread { [self] in
            while let job = next() {
                job.runSynchronously(on: asUnownedTaskExecutor())
                ran.withLock { $0 += 1 }
            }
        }.start()
    }

    func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        enqueued.withLock { $0 += 1 }
        condition.lock()
        queued.append(job)
        condition.broadcast()
        condition.unlock()
    }

    /// Lets `count` more jobs run.
    func release(_ count: Int = 1) {
        condition.lock()
        released += count
        condition.broadcast()
        condition.unlock()
    }

    /// Ends the thread once every queued job that may run has run.
    func stop() {
        condition.lock()
        stopped = true
        condition.broadcast()
        condition.unlock()
    }

    private func next() -> UnownedJob? {
        condition.lock()
        defer { condition.unlock() }
        while queued.isEmpty || released == 0 {
            if stopped { return nil }
            condition.wait()
        }
        released -= 1
        return queued.removeFirst()
    }
}

extension KNetTests {
    @Test("a task cancelled after run()'s blocking call failed but before run() returned: .clientClosed / .serverClosed, as documented")
    func runCancelledAsItFails() async throws {
        let reserved = try ReservedPort()
        let refusedPort = reserved.port
        let cases: [(String, @Sendable () -> @Sendable () async throws -> Void, KNetError)] = [
            ("client", {
                let client = TCPClient("127.0.0.1:\(refusedPort)") // retry off: the dial error ends it
                return { try await client.run() }
            }, .clientClosed),
            ("server", {
                let server = TCPServer("no port here")
                return { try await server.run() }
            }, .serverClosed),
        ]
        for (name, make, expected) in cases {
            // A call that fails before run() has suspended resumes it without a hop (then
            // the task is never held): try again, a bounded number of times.
            var held = false
            for _ in 0..<20 where !held {
                let body = make()
                let gate = GatedExecutor()
                defer { gate.stop() }
                let finished = Locked(false)
                let running = Task(executorPreference: gate) { () -> KNetError? in
                    defer { finished.withLock { $0 = true } }
                    do {
                        try await body()
                        return nil
                    } catch {
                        return error as? KNetError
                    }
                }
                #expect(await eventuallyAsync { gate.enqueued.withLock { $0 } == 1 })
                gate.release() // the task starts: run() starts its thread and suspends
                #expect(await eventuallyAsync { gate.ran.withLock { $0 } == 1 })
                if finished.withLock({ $0 }) {
                    _ = await running.value
                    continue
                }
                // The blocking call has failed and resumed run(), which waits for the gate.
                #expect(await eventuallyAsync { gate.enqueued.withLock { $0 } == 2 })
                held = true
                running.cancel() // = close(), while run() is still suspended
                gate.release(.max / 2)
                let got = await running.value
                #expect(got == expected, "\(name)")
            }
            #expect(held, "\(name): never held")
        }
    }
}
