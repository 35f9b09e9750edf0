// Flow control through the Swift API: pauseReading / resumeReading keep every byte read
// and hold the peer back; whenDrained runs once, on the loop thread, when the queue is
// empty. The C suite's test_flow.c checks the same core with more cases.
import Foundation
import KNet
import Testing

extension KNetTests {
    @Suite("flow control")
    struct FlowControl {
        /// Waits until conn's loop has taken a turn: a whenDrained body on an empty queue
        /// runs then. Returns the thread it ran on.
        static func loopTurn(_ conn: TCPConnection) throws -> pthread_t? {
            let ran = DispatchSemaphore(value: 0)
            let thread = Locked<pthread_t?>(nil)
            try conn.whenDrained { _ in
                thread.withLock { $0 = pthread_self() }
                ran.signal()
            }
            guard ran.wait(timeout: .now() + 10) == .success else { return nil }
            return thread.withLock { $0 }
        }

        @Test("a pause in receive keeps the rest of the read; the resume delivers every message, in order")
        func pauseInReceiveKeepsTheRest() throws {
            let first = Locked(true)
            let handler = RecordingHandler(onReceive: { conn, _ in
                if first.withLock({ f in defer { f = false }; return f }) { conn.pauseReading() }
            })
            let harness = try ServerHarness(handler: handler, codec: StdCodec())
            let count = 12_000 // 72 KB: more than one read, more than StdCodec's max frame
            let frames = (0..<count).map { i in [0, 4] + withUnsafeBytes(of: UInt32(i).bigEndian, Array.init) }
            let peer = try PlainSocket(port: harness.port)
            try peer.write(frames.flatMap { $0 })
            #expect(eventually { handler.totalMessages >= 1 })
            let conn = try #require(handler.only?.object)
            let thread = try Self.loopTurn(conn)
            #expect(thread.map { pthread_equal($0, handler.only!.thread) != 0 } == true)
            #expect(handler.totalMessages == 1)
            conn.resumeReading()
            #expect(eventually { handler.totalMessages == count })
            #expect(handler.only?.messages == frames.map { Array($0.dropFirst(2)) })
            #expect(harness.stop() == .serverClosed)
        }

        @Test("paused from connect(true), the peer is held back; resumed, every byte arrives and then its close")
        func pauseHoldsThePeerBack() throws {
            let handler = RecordingHandler(onConnect: { $0.pauseReading() })
            let harness = try ServerHarness(handler: handler, codec: nil)
            let peer = try PlainSocket(port: harness.port)
            let data = pattern(100_000)
            try peer.write(data)
            peer.shutdownWrite()
            #expect(eventually { handler.connectionCount == 1 })
            let conn = try #require(handler.only?.object)
            #expect(try Self.loopTurn(conn) != nil)
            #expect(handler.totalBytes == 0 && handler.only?.disconnects == 0)
            conn.resumeReading()
            #expect(eventually { handler.only?.disconnects == 1 })
            #expect(handler.only?.bytes == data)
            #expect(handler.only?.reasonAtDisconnect == .error(.endOfStream))
            #expect(throws: KNetError.connectionClosed) { try conn.whenDrained { _ in } }
            #expect(harness.stop() == .serverClosed)
        }

        @Test("a Swift codec: a pause in receive keeps the rest of the read; the resume delivers every message, in order")
        func pauseInReceiveKeepsTheRestSwiftCodec() throws {
            let first = Locked(true)
            let handler = RecordingHandler(onReceive: { conn, _ in
                if first.withLock({ f in defer { f = false }; return f }) { conn.pauseReading() }
            })
            let harness = try ServerHarness(handler: handler, codec: SwiftOnly(StdCodec()))
            let count = 12_000
            let frames = (0..<count).map { i in [0, 4] + withUnsafeBytes(of: UInt32(i).bigEndian, Array.init) }
            let peer = try PlainSocket(port: harness.port)
            try peer.write(frames.flatMap { $0 })
            #expect(eventually { handler.totalMessages >= 1 })
            let conn = try #require(handler.only?.object)
            #expect(try Self.loopTurn(conn) != nil)
            #expect(handler.totalMessages == 1)
            conn.resumeReading()
            #expect(eventually { handler.totalMessages == count })
            #expect(handler.only?.messages == frames.map { Array($0.dropFirst(2)) })
            #expect(handler.snapshot.contractFailures == 0)
            #expect(harness.stop() == .serverClosed)
        }

        final class Token: Sendable {
            let released: Locked<Bool>
            init(_ released: Locked<Bool>) { self.released = released }
            deinit { released.withLock { $0 = true } }
        }

        @Test("a whenDrained body waiting when the connection closes never runs and is released (no cycle with its connection)")
        func waitingDrainBodyReleasedOnClose() throws {
            let handler = RecordingHandler()
            let harness = try ServerHarness(handler: handler, codec: nil)
            let peer = try PlainSocket(port: harness.port) // reads nothing
            #expect(eventually { handler.connectionCount == 1 })
            let conn = try #require(handler.only?.object)
            try conn.send(pattern(16 << 20)) // far more than the kernel's buffers
            let released = Locked(false), ran = Locked(false)
            do {
                let token = Token(released)
                try conn.whenDrained { c in
                    _ = (token, conn, c)
                    ran.withLock { $0 = true }
                }
            }
            #expect(released.withLock { $0 } == false)
            conn.close()
            #expect(eventually { handler.only?.disconnects == 1 })
            #expect(eventually { released.withLock { $0 } })
            #expect(ran.withLock { $0 } == false)
            _ = peer
            #expect(harness.stop() == .serverClosed)
        }

        /// The sink (first connection) has a 64 KiB queue bound; what the source (second)
        /// sends is relayed to it. A refused send is kept, the source paused, and the sink's
        /// whenDrained resends it and resumes the source.
        final class Relay: TCPHandler {
            struct State {
                var sink: TCPConnection?
                var source: TCPConnection?
                var pauses = 0
                var errors: [any Error] = []
            }
            let state = Locked(State())

            func connect(_ conn: TCPConnection, connected: Bool) {
                if connected {
                    state.withLock { s in
                        if s.sink == nil {
                            conn.setMaxQueuedBytes(64 << 10)
                            s.sink = conn
                        } else {
                            s.source = conn
                        }
                    }
                } else if conn === state.withLock({ $0.source }) {
                    state.withLock { $0.sink }?.shutdown() // the rest, then EOF
                }
            }

            func receive(_ conn: TCPConnection, _ buf: [UInt8]) {
                guard let sink = state.withLock({ $0.sink }) else { return }
                do {
                    try sink.send(buf)
                } catch KNetError.pendingSendFull {
                    state.withLock { $0.pauses += 1 }
                    conn.pauseReading()
                    do {
                        try sink.whenDrained { sink in
                            do { try sink.send(buf) } catch { self.state.withLock { $0.errors.append(error) } }
                            conn.resumeReading()
                        }
                    } catch {
                        state.withLock { $0.errors.append(error) }
                    }
                } catch {
                    state.withLock { $0.errors.append(error) }
                }
            }
        }

        @Test("a relay paces its source to a late reader through a 64 KiB bound: every byte, in order, then EOF")
        func relayPacesSourceToReader() throws {
            let relay = Relay()
            let harness = try ServerHarness(handler: relay, codec: nil)
            let sink = try PlainSocket(port: harness.port)
            #expect(eventually { relay.state.withLock { $0.sink != nil } })
            let source = try PlainSocket(port: harness.port)
            let total = 8 << 20
            let data = pattern(total)
            let fd = source.fd // PlainSocket is not Sendable; source outlives the writer
            let writer = Background {
                var offset = 0
                while offset < data.count {
                    let n = data.withUnsafeBytes { send(fd, $0.baseAddress! + offset, Swift.min(65536, $0.count - offset), Int32(MSG_NOSIGNAL)) }
                    if n < 0 && errno == EINTR { continue }
                    guard n > 0 else { throw KNetError.system(errno: errno) }
                    offset += n
                }
                shutdown(fd, Int32(SHUT_WR))
            }
            #expect(eventually { relay.state.withLock { $0.pauses } >= 1 }) // the reader starts late
            var received: [UInt8] = []
            received.reserveCapacity(total)
            try sink.readToEnd { received += $0 }
            #expect(writer.join() == nil)
            #expect(received.count == total)
            #expect(received == data)
            #expect(relay.state.withLock { $0.errors.isEmpty })
            #expect(harness.stop() == .serverClosed)
        }
    }
}
