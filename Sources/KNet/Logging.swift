import CKNet
import Logging

/// The logger knet's C core writes to; created on first use, so a `LoggingSystem.bootstrap`
/// done before the first server or client is created decides where knet logs go.
let knetLogger = Logger(label: "knet")

/// Routes the C core's log lines to swift-log, once (the first server or client does this).
let knetLoggingInstalled: Void = {
    let minLevel: Int32
    switch knetLogger.logLevel {
    case .trace, .debug: minLevel = Int32(KNET_LOG_DEBUG.rawValue)
    case .info, .notice: minLevel = Int32(KNET_LOG_INFO.rawValue)
    case .warning: minLevel = Int32(KNET_LOG_WARN.rawValue)
    case .error, .critical: minLevel = Int32(KNET_LOG_ERROR.rawValue)
    }
    knet_set_log(knetLogSink, minLevel, nil)
}()

/// The C log callback: runs on whichever thread logs (loop, serving or dialing thread).
private func knetLogSink(_ level: Int32, _ message: UnsafePointer<CChar>?, _ ud: UnsafeMutableRawPointer?) {
    guard let message else { return }
    let swiftLevel: Logger.Level
    switch UInt32(bitPattern: level) {
    case KNET_LOG_DEBUG.rawValue: swiftLevel = .debug
    case KNET_LOG_INFO.rawValue: swiftLevel = .info
    case KNET_LOG_WARN.rawValue: swiftLevel = .warning
    default: swiftLevel = .error
    }
    knetLogger.log(level: swiftLevel, "\(String(cString: message))")
}

/// Sets the number of event-loop threads (0 = online CPUs); call it before the first
/// server or client is created (usually spelled `KNet.setLoopThreads(n)`).
/// Throws `KNetError.busy` once the loops run; traps when `count` is negative or above
/// `UInt32.max`.
public func setLoopThreads(_ count: Int) throws {
    precondition(count >= 0 && count <= Int(UInt32.max), "loop thread count out of range")
    let rc = knet_set_loop_threads(UInt32(count))
    if rc != 0 { throw KNetError(code: rc) }
}

/// The number of event-loop threads that run, or will run once started.
public var loopThreadCount: Int { Int(knet_loop_threads()) }
